"""Rows per forward-only call on CPU: HopSkipJump and randomized-smoothing certification by call size.

Both split their queries into calls of any size (``fortify.models.batching``). This script runs
each at several call sizes, interleaved in one process on the digits small-cnn, and prints the
median wall time per size with what each returned (HopSkipJump's median found L2 distance, the
certificates' mean radius), so that a faster size that changes the answer shows.

    .venv/bin/python bench/query_batch.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from _common import NUM_CLASSES, add_allocator_option, apply_process_options, digits_setting, print_provenance
from fortify.attacks import HopSkipJump
from fortify.evaluation.certify import certify
from fortify.threat import ThreatModel


def timed_rounds(runs: dict[int, Callable[[], float]], repeats: int) -> dict[int, tuple[float, float]]:
    """Median seconds and the answer per size; the order of sizes reverses every round."""
    seconds: dict[int, list[float]] = {size: [] for size in runs}
    answers: dict[int, float] = {}
    sizes = list(runs)
    for r in range(repeats):
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            start = time.perf_counter()
            answers[size] = runs[size]()
            seconds[size].append(time.perf_counter() - start)
    return {size: (statistics.median(seconds[size]), answers[size]) for size in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hsj-examples", type=int, default=32)
    parser.add_argument("--hsj-iter", type=int, default=20)
    parser.add_argument("--certify-examples", type=int, default=100)
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=None, help="test examples loaded (default: all)")
    parser.add_argument("--batch", type=int, default=256, help="smallest number of examples loaded")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_process_options(args)
    setting = digits_setting(args)
    model, x, y = setting.model, setting.x, setting.y
    print_provenance([])
    print(f"setting:  {setting.description}; HopSkipJump L2, {args.hsj_iter} iterations, "
          f"{args.hsj_examples} examples; certify sigma 0.25, n 1000, {args.certify_examples} examples; "
          f"{args.repeats} interleaved rounds, medians\n")

    def hsj(size: int) -> Callable[[], float]:
        attack = HopSkipJump(ThreatModel("l2", 1.0), max_iter=args.hsj_iter, max_queries=1_000_000,
                             batch_size=size, seed=args.seed)
        return lambda: float(attack.minimal(model, x[:args.hsj_examples], y[:args.hsj_examples])[1].median())

    def smoothing(size: int) -> Callable[[], float]:
        n = args.certify_examples
        return lambda: float(certify(model, x[:n], sigma=0.25, n=1000, alpha=0.001, num_classes=NUM_CLASSES,
                                     batch_size=size, seed=args.seed).radii.mean())

    print("| work | rows per call | median s | time / largest | answer |")
    print("|---|---:|---:|---:|---:|")
    for work, build, sizes, answer in (("HopSkipJump", hsj, (4096, 512, 256), "median L2 distance"),
                                       ("certify", smoothing, (1024, 512, 256), "mean radius")):
        results = timed_rounds({size: build(size) for size in sizes}, args.repeats)
        largest = results[sizes[0]][0]
        for size, (seconds, value) in results.items():
            print(f"| {work} | {size} | {seconds:.2f} | {seconds / largest:.2f} | {answer} {value:.4f} |")


if __name__ == "__main__":
    main()
