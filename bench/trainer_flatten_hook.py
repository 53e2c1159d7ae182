"""The Trainer's channels_last `nn.Flatten` gradient hook, on and off, in one process.

fortify's Trainer installs the hook for the duration of `fit` when `train.channels_last` is on
(`fortify.models.layout.flatten_gradient_hooks`). Here fresh small-cnn models (same seed) train on
the digits split with bf16 autocast and channels_last, alternately with the hook and with the
Trainer's hook context replaced by a no-op, and the script prints the median wall time of each.

    .venv/bin/python bench/trainer_flatten_hook.py --threads 1 --repeats 11 --objectives standard,fgsm-rs,pgd
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from _common import add_allocator_option, apply_process_options, check_repeats, load_average, print_provenance
from fortify.config import TrainConfig
from fortify.data import load_dataset
from fortify.data.base import Split
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training import trainer as trainer_module
from fortify.training.objectives import ObjectiveOptions, build_objective


def fit_seconds(objective: str, data: Split, args: argparse.Namespace, hook: bool) -> float:
    threat = ThreatModel("linf", args.eps)
    config = TrainConfig(objective=objective, epochs=args.epochs, batch_size=args.batch, lr=0.05,
                         momentum=0.9, weight_decay=0.0, schedule="constant", early_stopping=False,
                         attack_steps=args.attack_steps, seed=args.seed, amp=True, channels_last=True)
    torch.manual_seed(args.seed)
    model = build_model("small-cnn", tuple(data.x.shape[1:]), 10)
    trainer = trainer_module.Trainer(model, build_objective(objective, ObjectiveOptions(
        threat, attack_steps=args.attack_steps, seed=args.seed)), config, threat=threat, show_progress=False)
    installed = trainer_module.flatten_gradient_hooks
    if not hook:  # the Trainer looks the context up in its module at fit time
        trainer_module.flatten_gradient_hooks = lambda _model: contextlib.nullcontext()
    try:
        start = time.perf_counter()
        trainer.fit(data, Split(data.x[:8], data.y[:8]))  # 8 validation examples: off the clock
        return time.perf_counter() - start
    finally:
        trainer_module.flatten_gradient_hooks = installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--objectives", type=lambda s: s.split(","), default=["standard", "fgsm-rs", "pgd"])
    parser.add_argument("--seed", type=int, default=0)
    add_allocator_option(parser)
    args = parser.parse_args()
    check_repeats(parser, args)
    apply_process_options(args)
    data = load_dataset("digits").train
    print_provenance([])
    print(f"setting:  small-cnn on digits ({len(data)} examples), {args.epochs} epochs, batch {args.batch}, "
          f"bf16 autocast + channels_last; {args.repeats} alternating pairs; medians\n")
    print("| objective | with hook s | without hook s | with / without |")
    print("|---|---:|---:|---:|")
    for objective in args.objectives:
        times: dict[bool, list[float]] = {True: [], False: []}
        for hook in (True, False):  # warm-up
            fit_seconds(objective, data, args, hook)
        for r in range(args.repeats):
            for hook in ((True, False) if r % 2 else (False, True)):
                times[hook].append(fit_seconds(objective, data, args, hook))
        with_hook, without = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {objective} | {with_hook:.3f} | {without:.3f} | {with_hook / without:.2f} |")
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
