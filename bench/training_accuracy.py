"""What the training benchmark's accuracy columns would say over many seeds: fortify's Trainer against
ART's trainers, each trained once per seed, untimed.

``training_throughput.py`` prints the clean and PGD-20 accuracy of one training run per contender,
the same seed in every repeat; after a few epochs on 1,258 examples those numbers move by several
points from one seed to the next. This script trains the same contenders (the same setting, the same
``measure``) for each seed of ``--seeds`` and prints every run, then per contender the mean, min and
max, so that a difference between the libraries can be told from the spread of either.

    taskset -c 1 .venv/bin/python bench/training_accuracy.py --threads 1 --epochs 10 --objectives pgd \
        --variants default --seeds 0:16
"""

from __future__ import annotations

import argparse
import statistics
import sys

import training_throughput as throughput
from _common import apply_process_options, print_provenance
from fortify.data import load_dataset


def parse_seeds(text: str) -> range:
    start, _, stop = text.partition(":")
    seeds = range(int(start), int(stop))
    if len(seeds) < 2:
        raise argparse.ArgumentTypeError(f"--seeds needs a range of at least two seeds, as 0:8, got {text!r}")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, default=range(0, 8), help="start:stop, as 0:8")
    known, rest = parser.parse_known_args()
    # every other option is training_throughput's (--threads, --epochs, --objectives, --variants, ...)
    args = throughput.parse_args(rest)
    apply_process_options(args)
    data = load_dataset("digits")
    print_provenance([("art", "adversarial-robustness-toolbox")])
    print(f"setting:  as training_throughput.py, {args.epochs} epochs; seeds {known.seeds.start} to "
          f"{known.seeds.stop - 1}; clean and PGD-20 accuracy on the test split ({len(data.test)} examples)")
    contenders = throughput.build_contenders(args)
    for seed in known.seeds:
        args.seed = seed
        for contender in contenders:
            throughput.measure(contender, data.train, data.test, args)
            run = (f"  seed {seed:>3} {contender.group:>10} {contender.library}: "
                   f"clean {contender.clean[-1]:.2%}, PGD-20 {contender.robust[-1]:.2%}")
            print(run, file=sys.stderr, flush=True)
    print("\n| objective | library | runs | clean acc mean | min-max | PGD-20 acc mean | min-max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for c in contenders:
        print(f"| {c.group} | {c.library} | {len(c.clean)} | {statistics.mean(c.clean):.2%} | "
              f"{min(c.clean):.2%}-{max(c.clean):.2%} | {statistics.mean(c.robust):.2%} | "
              f"{min(c.robust):.2%}-{max(c.robust):.2%} |")


if __name__ == "__main__":
    main()
