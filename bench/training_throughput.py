"""Adversarial training throughput on CPU: fortify's Trainer against IBM ART's trainers.

Each contender trains a fresh small-cnn (same seed, so the same initial weights) on the training
split of an embedded set (``--dataset``: digits, 8x8, or mnist5k, 28x28) for ``--epochs`` epochs
with the same batch size, SGD learning rate and momentum, thread count and L-inf eps, in this one
process; the contenders run in an order shuffled afresh (seeded) for each repeat. The model is
wrapped in a counter of forward and backward passes. Afterwards each trained model is attacked with
fortify's PGD-20 on the test split, so that an epoch that is cheap because it trains less hard
shows as less robust.

    .venv/bin/python bench/training_throughput.py --threads 1 --repeats 5 --epochs 5

Pairs: standard / ART ``PyTorchClassifier.fit``; fgsm-rs / ``AdversarialTrainerFBFPyTorch``;
pgd-10 / ``AdversarialTrainerMadryPGD``; trades / ``AdversarialTrainerTRADESPyTorch``;
awp-pgd / ``AdversarialTrainerAWPPyTorch``. fortify runs once per ``--variants`` entry
(``_common.FORTIFY_VARIANTS``): ``default``, the Trainer as it comes (fp32; on CPU channels_last
weights where the model runs so, linear layers on oneDNN where that pays), ``nchw``, in the layout
ART trains in, ``torch-linear``, with torch's own linear layers (``FORTIFY_ONEDNN_LINEAR=0``), and
``fast``, with bf16 autocast as well (``train.amp``), which pays off on CPUs with native bf16
(AVX512-BF16 or AMX) and on GPUs and is left out elsewhere, and ``fbf-schedule``, with the learning
rate and gradient clipping ART's FBF trainer sets itself (for fgsm-rs's accuracy columns).
``--art-channels-last`` adds ART's trainers on the model as fortify's Trainer runs it on CPU:
channels_last weights with the ``nn.Flatten`` gradient hook, linear layers on oneDNN where that pays,
and the fused SGD step (AWP's proxy model alike).
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

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's per-epoch progress bars would fill the output

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
from fortify.training.methods import MethodOptions
from fortify.training.objectives import build_objective
from fortify.training.trainer import Trainer

# (fortify objective, ART trainer) per row group
PAIRS = (("standard", "PyTorchClassifier.fit"), ("fgsm-rs", "AdversarialTrainerFBFPyTorch"),
         ("pgd", "AdversarialTrainerMadryPGD"), ("trades", "AdversarialTrainerTRADESPyTorch"),
         ("awp-pgd", "AdversarialTrainerAWPPyTorch"))

# trains ForwardCounter-wrapped model on (train, args); returns nothing
TrainFn = Callable[[ForwardCounter, Split, argparse.Namespace], None]


@dataclass
class Contender:
    group: str
    library: str
    train: TrainFn
    seconds: list[float] = field(default_factory=list)
    forward: list[int] = field(default_factory=list)
    backward: list[int] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)


# -- fortify -----------------------------------------------------------------------------------


def fortify_trainer(objective: str, settings: dict[str, Any]) -> TrainFn:
    """fortify's Trainer with the variant's ``settings`` (``_common.FORTIFY_VARIANTS``) over the
    benchmark's own."""
    def train(model: ForwardCounter, data: Split, args: argparse.Namespace) -> None:
        threat = ThreatModel("linf", args.eps)
        options = MethodOptions(threat, attack_steps=args.attack_steps, awp_warmup_epochs=args.awp_warmup,
                                seed=args.seed)  # the attacks' random starts follow --seed, as ART's do
        # constant lr, no weight decay, no early stopping: the ART trainers have none of them (a
        # variant may set the schedule)
        config = TrainConfig(**{"objective": objective, "epochs": args.epochs, "batch_size": args.batch,
                                "lr": args.lr, "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
                                "early_stopping": False, "attack_steps": args.attack_steps,
                                "awp_warmup_epochs": args.awp_warmup, "seed": args.seed, **settings})
        # the Trainer validates after each epoch; a split of 8 examples keeps that out of the timing
        val = Split(data.x[:8], data.y[:8])
        Trainer(model, build_objective(objective, options), config, threat=threat,
                show_progress=False).fit(data, val)
    return train


# -- ART ---------------------------------------------------------------------------------------


def art_classifier(model: nn.Module, args: argparse.Namespace, shape: tuple[int, ...],
                   momentum: float = 0.9, fused: bool = False) -> object:
    from art.estimators.classification import PyTorchClassifier

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum, fused=fused)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=optimizer, input_shape=shape,
                             nb_classes=NUM_CLASSES, clip_values=(0.0, 1.0), device_type="cpu")


def art_pgd(classifier: object, args: argparse.Namespace) -> object:
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(classifier, norm=np.inf, eps=args.eps,
                                    eps_step=2.5 * args.eps / args.attack_steps, max_iter=args.attack_steps,
                                    num_random_init=1, batch_size=args.batch, verbose=False)


def art_trainer(kind: str, on_channels_last: bool = False) -> TrainFn:
    """ART's trainer of ``kind``; ``on_channels_last``: on the model as fortify's Trainer runs it on
    CPU, channels_last weights (ART passes NCHW batches, which a channels_last convolution accepts)
    and linear layers on oneDNN where that pays (``_common.CPU_KERNELS``)."""
    def train(model: ForwardCounter, data: Split, args: argparse.Namespace) -> None:
        with as_fortify_trains_on_cpu(model) if on_channels_last else contextlib.nullcontext():
            _fit_art(kind, model, data, args, on_channels_last)
        model.eval()
    return train


def _fit_art(kind: str, model: ForwardCounter, data: Split, args: argparse.Namespace,
             on_channels_last: bool) -> None:
    from art.defences import trainer as art

    # on fortify's kernels ART also gets the fused SGD step fortify's Trainer takes
    classifier = art_classifier(model, args, tuple(data.x.shape[1:]), fused=on_channels_last)
    # one-hot labels: ART's FBF trainer needs them, the others accept them
    x, y = data.x.numpy(), torch.nn.functional.one_hot(data.y, NUM_CLASSES).float().numpy()
    fit = {"batch_size": args.batch, "nb_epochs": args.epochs}
    if kind == "standard":
        classifier.fit(x, y, **fit)  # type: ignore[attr-defined]
    elif kind == "fgsm-rs":
        art.AdversarialTrainerFBFPyTorch(classifier, eps=args.eps).fit(x, y, **fit)
    elif kind == "pgd":
        madry = art.AdversarialTrainerMadryPGD(classifier, nb_epochs=args.epochs, batch_size=args.batch,
                                               eps=args.eps, eps_step=2.5 * args.eps / args.attack_steps,
                                               max_iter=args.attack_steps, num_random_init=1)
        # the trainer's PGD gets no batch size of its own and would attack in ART's default chunks
        # of 32: half batches, twice the calls of the other trainers' attacks
        madry.attack.set_params(batch_size=args.batch)
        madry.fit(x, y)
    elif kind == "trades":
        trades = art.AdversarialTrainerTRADESPyTorch(classifier, art_pgd(classifier, args), beta=6.0)
        trades.fit(x, y, **fit)
    elif kind == "awp-pgd":
        shape = tuple(data.x.shape[1:])
        # ART's scratch copy for the weight perturbation, wrapped alike so that the weights load;
        # its passes go to its own counter and are not reported. Its optimiser has no momentum: the
        # authors' proxy steps along this batch's gradient alone, as fortify's does (with momentum
        # ART's perturbation follows a running sum of earlier batches' gradients)
        proxy_model = ForwardCounter(build_model("small-cnn", shape, NUM_CLASSES))
        proxy = art_classifier(proxy_model, args, shape, momentum=0.0, fused=on_channels_last)
        # on fortify's kernels the proxy runs on them too, as fortify's (a copy of its model) does
        with as_fortify_trains_on_cpu(proxy_model) if on_channels_last else contextlib.nullcontext():
            art.AdversarialTrainerAWPPyTorch(classifier, proxy, art_pgd(classifier, args), mode="PGD",
                                             gamma=5e-3, beta=6.0, warmup=args.awp_warmup).fit(x, y, **fit)


# -- measuring ---------------------------------------------------------------------------------


def build_contenders(args: argparse.Namespace) -> list[Contender]:
    def group_of(objective: str) -> str:
        return f"{objective}-{args.attack_steps}" if objective in ("pgd", "awp-pgd") else objective
    return [Contender(*row) for row in trainer_rows(args, PAIRS, group_of, fortify_trainer, art_trainer)]


def measure(contender: Contender, train: Split, test: Split, args: argparse.Namespace) -> None:
    import numpy as np

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # ART's trainers shuffle and draw their random starts from NumPy's generator
    model = ForwardCounter(build_model("small-cnn", tuple(train.x.shape[1:]), NUM_CLASSES))
    start = time.perf_counter()
    contender.train(model, train, args)
    contender.seconds.append(time.perf_counter() - start)
    contender.forward.append(model.examples)
    contender.backward.append(model.backward_examples)
    inner = model.inner.eval()
    contender.clean.append(accuracy(inner, test.x, test.y, 512))
    pgd = PGD(ThreatModel("linf", args.eps), steps=20, random_start=True, seed=args.seed)
    x_adv = pgd(inner, test.x, test.y)
    contender.robust.append(accuracy(inner, x_adv, test.y, 512))


def print_table(contenders: list[Contender], n_train: int, epochs: int) -> None:
    baseline: dict[str, float] = {}
    for c in contenders:  # each group's first row: fortify's first variant
        baseline.setdefault(c.group, median(c.seconds))
    seen = n_train * epochs
    print()
    print("| objective | library | median s / epoch | min-max s / epoch | examples/s | time / fortify "
          "| forward / example | backward / example | clean acc | PGD-20 acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        seconds = median(c.seconds)
        print(f"| {c.group} | {c.library} | {seconds / epochs:.3f} | {min(c.seconds) / epochs:.3f}-"
              f"{max(c.seconds) / epochs:.3f} | {seen / seconds:,.0f} | {seconds / baseline[c.group]:.2f} "
              f"| {median(c.forward) / seen:.3g} | {median(c.backward) / seen:.3g} "
              f"| {median(c.clean):.2%} | {median(c.robust):.2%} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--objectives", type=lambda s: s.split(","), default=[p[0] for p in PAIRS],
                        help=f"comma separated, from {', '.join(p[0] for p in PAIRS)}")
    parser.add_argument("--awp-warmup", type=int, default=2,
                        help="epochs of plain PGD training before AWP starts (both libraries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-art", action="store_true")
    parser.add_argument("--dataset", choices=("digits", "mnist5k"), default="digits",
                        help="the embedded set to train on: 8x8 digits or 28x28 MNIST-5k")
    add_variant_options(parser)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    unknown = set(args.objectives) - {p[0] for p in PAIRS}
    if unknown:
        parser.error(f"unknown objectives {sorted(unknown)}; valid: {', '.join(p[0] for p in PAIRS)}")
    check_repeats(parser, args)
    check_variants(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_process_options(args)
    data = load_dataset(args.dataset)
    contenders = build_contenders(args)
    print_provenance([("art", "adversarial-robustness-toolbox")])
    print(f"setting:  small-cnn (fresh, seed {args.seed}) on {args.dataset}: {len(data.train)} training "
          f"examples, "
          f"{args.epochs} epochs, batch {args.batch}, SGD lr {args.lr} momentum 0.9, constant lr, "
          "no weight decay")
    print(f"attacks:  training linf eps={args.eps}, PGD {args.attack_steps} steps of 2.5*eps/steps; "
          f"AWP gamma 5e-3 after {args.awp_warmup} warm-up epochs (ART's proxy: SGD without momentum); "
          f"evaluation PGD-20 (1 random start) on the test split ({len(data.test)} examples)")
    print(f"timing:   {args.repeats} interleaved repeats (order shuffled per repeat, seeded), each a full "
          "training run; medians")
    for r in range(args.repeats):
        for contender in repeat_order(contenders, r, args.seed):
            measure(contender, data.train, data.test, args)
        print(f"  repeat {r + 1}/{args.repeats} done (load {load_average()})", file=sys.stderr)
    print_table(contenders, len(data.train), args.epochs)
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
