"""What fortify's input checks cost an attack: FGSM called as users call it (``attack(model, x, y)``,
which first checks the batch: finite, in the box, integer labels) and through ``Attack.run`` (the
same attack without those checks), against torchattacks' FGSM, which checks nothing.

FGSM is the attack where a fixed cost per call weighs most (one forward and one backward pass). All
three run on the same frozen small-cnn, trained on digits, with fortify's CPU kernels
(channels_last weights, oneDNN linear layers where that pays), in batches of ``--batch`` over the
test split, interleaved in an order shuffled per repeat, in this one process. Many repeats, since
one run takes about as long as the machine's noise moves it.

    .venv/bin/python bench/input_check_cost.py --threads 1 --repeats 61 --keep-freed-memory
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import (
    ForwardCounter,
    add_allocator_option,
    add_weights_option,
    apply_process_options,
    check_repeats,
    digits_setting,
    load_average,
    median,
    print_provenance,
    repeat_order,
    run_channels_last,
    settle_weights,
)
from fortify.attacks import FGSM
from fortify.threat import ThreatModel


def contenders(model: torch.nn.Module, eps: float, seed: int) -> dict[str, object]:
    import torchattacks

    fgsm = FGSM(ThreatModel("linf", eps), seed=seed)
    theirs = torchattacks.FGSM(model, eps=eps)
    return {
        "fortify attack(model, x, y)": lambda x, y: fgsm(model, x, y),
        "fortify Attack.run (no input checks)": lambda x, y: fgsm.run(model, x, y),
        "torchattacks FGSM": lambda x, y: theirs(x, y),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=61, help="timed repeats (>= 5)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--examples", type=int, default=None, help="examples (default: digits test split)")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    add_weights_option(parser)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    check_repeats(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_process_options(args)
    setting = digits_setting(args)
    weights = settle_weights(setting.model, args)
    counted = ForwardCounter(setting.model).eval()
    rows = {label: run_channels_last(run, counted)
            for label, run in contenders(counted, args.eps, args.seed).items()}
    batches = list(zip(setting.x.split(args.batch), setting.y.split(args.batch), strict=True))
    seconds: dict[str, list[float]] = {label: [] for label in rows}
    outputs: dict[str, torch.Tensor] = {}
    for label, run in rows.items():  # warm-up
        outputs[label] = torch.cat([run(x, y) for x, y in batches])
    for r in range(args.repeats):
        for label in repeat_order(list(rows), r, args.seed):
            start = time.perf_counter()
            for x, y in batches:
                rows[label](x, y)
            seconds[label].append(time.perf_counter() - start)
    print_provenance([("torchattacks", "torchattacks")])
    print(f"setting:  {setting.description}; FGSM L-inf eps {args.eps}; batch {args.batch}; "
          "fortify's CPU kernels for every row")
    print(weights)
    print(f"timing:   1 warm-up round, then {args.repeats} interleaved repeats (order shuffled per repeat, "
          "seeded); medians\n")
    base = median(seconds["torchattacks FGSM"])
    reference = outputs["torchattacks FGSM"]
    print("| row | median ms | min-max ms | time / torchattacks | largest gap to torchattacks' points |")
    print("|---|---:|---:|---:|---:|")
    for label, times in seconds.items():
        gap = float((outputs[label] - reference).abs().max())
        print(f"| {label} | {median(times) * 1e3:.2f} | {min(times) * 1e3:.2f}-{max(times) * 1e3:.2f} "
              f"| {median(times) / base:.3f} | {gap:.2g} |")
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
