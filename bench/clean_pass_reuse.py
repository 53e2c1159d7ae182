"""The objectives that need the model's output at the clean batch twice, with one pass and with two.

``fgsm`` (with a ratio between 0 and 1) and ``trades`` read the clean batch once for their attack
(eval mode) and once for the clean term of the loss (training mode). For a model that computes the
same function in both modes (``fortify.models.modes.runs_alike_in_both_modes``) one training-mode
pass serves both. Here the same Trainer fits small-cnn on digits both ways, in alternating order in
one process: the model wrapped in ``_common.ForwardCounter``, which declares itself
mode-independent, takes the one pass; wrapped in ``TwoPasses``, which declares nothing and so
counts as mode-dependent, the same model takes the papers' two. The script prints the median
seconds per epoch of each, their ratio, the forward passes per example, the page faults per epoch
(``--keep-freed-memory`` keeps them away from both ways alike) and the largest difference
of the two ways' final weights.

    taskset -c 1 .venv/bin/python bench/clean_pass_reuse.py --threads 1 --repeats 11 --objectives fgsm,trades
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from _common import (
    NUM_CLASSES,
    ForwardCounter,
    add_allocator_option,
    apply_process_options,
    check_repeats,
    median,
    print_provenance,
)
from fortify.config import TrainConfig
from fortify.data import Split, load_dataset
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.methods import MethodOptions
from fortify.training.objectives import build_objective
from fortify.training.trainer import Trainer


class TwoPasses(ForwardCounter):
    """The same counter without the declaration (``mode_independent`` is read off the class itself):
    the objectives take a pass of their own for the attack's clean output."""


def fit(wrapper: type[ForwardCounter], objective: str, data: Split, args: argparse.Namespace
        ) -> tuple[float, int, ForwardCounter]:
    """Seconds per epoch of one fit, its page faults per epoch, and the fitted (counting) model."""
    torch.manual_seed(args.seed)
    model = wrapper(build_model("small-cnn", tuple(data.x.shape[1:]), NUM_CLASSES))
    threat = ThreatModel("linf", args.eps)
    options = MethodOptions(threat, attack_steps=args.attack_steps, fgsm_ratio=args.fgsm_ratio)
    config = TrainConfig(objective=objective, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                         momentum=0.9, weight_decay=0.0, schedule="constant", early_stopping=False,
                         attack_steps=args.attack_steps, fgsm_ratio=args.fgsm_ratio, seed=args.seed)
    trainer = Trainer(model, build_objective(objective, options), config, threat=threat, show_progress=False)
    faults, started = minor_faults(), time.perf_counter()
    trainer.fit(data, Split(data.x[:8], data.y[:8]))  # 8 validation examples: off the clock, nearly
    elapsed = time.perf_counter() - started
    return elapsed / args.epochs, (minor_faults() - faults) // args.epochs, model


def minor_faults() -> int:
    """Page faults of this process so far that the OS served without I/O (fresh zeroed pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compare(objective: str, data: Split, args: argparse.Namespace) -> None:
    ways = {"one clean pass": ForwardCounter, "two passes": TwoPasses}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    faults: dict[str, list[int]] = {name: [] for name in ways}
    models: dict[str, ForwardCounter] = {}
    for repeat in range(args.repeats):
        for name in (list(ways) if repeat % 2 else list(reversed(ways))):
            elapsed, faulted, models[name] = fit(ways[name], objective, data, args)
            seconds[name].append(elapsed)
            faults[name].append(faulted)
    one, two = models["one clean pass"], models["two passes"]
    weights = zip(one.state_dict().values(), two.state_dict().values(), strict=True)
    gap = max((a - b).abs().max().item() for a, b in weights)
    print(f"\n{objective}: {args.epochs} epochs of {data.x.shape[0]} examples, batch {args.batch}, "
          f"{args.repeats} repeats in alternating order")
    for name, model in models.items():
        print(f"{name:>15}: median {median(seconds[name]):.3f} s / epoch (best {min(seconds[name]):.3f}), "
              f"{model.examples / (args.epochs * data.x.shape[0]):.2f} forward passes / example, "
              f"median {median(faults[name]):,.0f} page faults / epoch")
    ratio = median(seconds["two passes"]) / median(seconds["one clean pass"])
    print(f"two passes / one clean pass: {ratio:.3f}; largest difference of the final weights: {gap:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--objectives", type=lambda s: s.split(","), default=["fgsm", "trades"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--fgsm-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    add_allocator_option(parser)
    args = parser.parse_args()
    check_repeats(parser, args)
    unknown = [name for name in args.objectives if name not in ("fgsm", "trades")]
    if unknown:
        parser.error(f"unknown objectives {unknown}; valid: fgsm, trades")
    apply_process_options(args)
    print_provenance([])
    data = load_dataset("digits").train
    print(f"setting:  small-cnn (fresh, seed {args.seed}) on digits, SGD lr {args.lr} momentum 0.9, "
          f"linf eps {args.eps}, fgsm ratio {args.fgsm_ratio}, TRADES {args.attack_steps} steps")
    for objective in args.objectives:
        compare(objective, data, args)


if __name__ == "__main__":
    main()
