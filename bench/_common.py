"""What the benchmarks in bench/ share: the counted model, the digits setting and the provenance.

The scripts run as ``python bench/<script>.py``, which puts this folder on ``sys.path``, so they
import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import random
import statistics
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fortify.allocator import keep_freed_memory
from fortify.config import TrainConfig
from fortify.data import load_dataset
from fortify.evaluation.precision import cpu_has_kernels_for
from fortify.models import build_model
from fortify.models.layout import flatten_gradient_hooks, to_channels_last
from fortify.models.onednn_linear import SETTING_VARIABLE as ONEDNN_LINEAR_VARIABLE
from fortify.models.onednn_linear import onednn_linear, onednn_linear_pays
from fortify.pipeline import eval_layout
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


# -- the model under test ----------------------------------------------------------------------


class ForwardCounter(nn.Module):
    """Passes inputs to ``inner`` and counts forward and backward passes and the examples in them.

    A backward pass is counted when a gradient reaches the model's output, whether it comes from
    ``loss.backward()`` or ``torch.autograd.grad``: both run the model's backward once.
    """

    mode_independent = True  # its forward never reads self.training (fortify.models.modes)

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.reset()

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.examples += x.shape[0]
        out = self.inner(x)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: Tensor) -> None:
        self.backward_calls += 1
        self.backward_examples += grad.shape[0]

    def reset(self) -> None:
        self.calls = 0
        self.examples = 0
        self.backward_calls = 0
        self.backward_examples = 0


def run_channels_last(run: Callable[[Tensor, Tensor], Any], model: nn.Module
                      ) -> Callable[[Tensor, Tensor], Any]:
    """``run`` on ``model`` as fortify's evaluation runs it on CPU, for each call: 4-D weights
    channels_last (``eval.channels_last``) and, where that pays, linear layers on oneDNN
    (``fortify.models.onednn_linear``); the conversion is timed with the call. Rows run so carry
    ``CPU_KERNELS`` in their label."""
    def converted(x: Tensor, y: Tensor) -> Any:
        with eval_layout(model, True):
            return run(x, y)
    return converted


# what run_channels_last (and the training benchmarks' ART rows on fortify's model) change, in labels
CPU_KERNELS = "channels_last" + (" + oneDNN linear" if onednn_linear_pays(torch.device("cpu")) else "")


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    """``--trainable-weights`` for the attack benchmarks (see ``settle_weights``)."""
    parser.add_argument("--trainable-weights", action="store_true",
                        help="leave the model's parameters trainable, as a model comes: the peers' attacks "
                             "that call .backward() then also compute each weight's gradient, which "
                             "fortify's never ask for (tables before the frozen default ran so)")


def settle_weights(model: nn.Module, args: argparse.Namespace) -> str:
    """Freeze ``model``'s parameters for every contender unless ``--trainable-weights``; the header
    line that says which. An attack needs the input's gradient alone: ART's, Foolbox's, torchattacks'
    C&W and FAB and pyautoattack's FAB take it with ``.backward()``, which with trainable weights
    also computes every weight's gradient. Frozen, they skip that work and return the same points."""
    model.requires_grad_(args.trainable_weights)
    if args.trainable_weights:
        return ("weights:  trainable (as a model comes): the peers' attacks that call .backward() "
                "compute weight gradients too")
    return "weights:  frozen for every contender (requires_grad off), so no attack computes weight gradients"


@contextlib.contextmanager
def as_fortify_trains_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as fortify's Trainer runs it on CPU, for a peer's trainer (``CPU_KERNELS``): its 4-D
    weights converted to channels_last (and left so), and for the duration the ``nn.Flatten``
    gradient hook the Trainer installs with them and its linear layers on oneDNN where that pays."""
    to_channels_last(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(flatten_gradient_hooks(model))
        if onednn_linear_pays(torch.device("cpu")):
            stack.enter_context(onednn_linear(model))
        yield model


@dataclass
class Setting:
    """What is attacked: a model in eval mode and the examples with their labels."""

    description: str
    model: nn.Module
    x: Tensor
    y: Tensor


def train_digits_model(epochs: int, seed: int, objective: str = "standard"
                       ) -> tuple[nn.Module, Tensor, Tensor]:
    """Trains small-cnn on digits with ``objective``; returns the model and the test split."""
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("small-cnn", data.input_shape, data.num_classes)
    threat = ThreatModel("linf", 0.2)
    config = TrainConfig(objective=objective, epochs=epochs, early_stopping=False, seed=seed)
    Trainer(model, build_objective(objective, ObjectiveOptions(threat)), config, threat=threat,
            show_progress=False).fit(data.train, data.val)
    return model.eval(), data.test.x, data.test.y


def tile(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` repeated as often as needed, cut to ``n`` examples."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n], y.repeat(reps)[:n]


def digits_setting(args: argparse.Namespace) -> Setting:
    """small-cnn trained on digits (``args.objective`` if the script has it, else standard)."""
    objective = getattr(args, "objective", "standard")
    model, x, y = train_digits_model(args.train_epochs, args.seed, objective)
    n = args.examples or max(x.shape[0], args.batch)
    x, y = tile(x, y, n)
    epochs = f"{args.train_epochs} epoch" + ("s" if args.train_epochs != 1 else "")
    return Setting(f"small-cnn trained {epochs} ({objective}) on digits, "
                   f"test split ({n} examples)", model, x, y)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    with torch.inference_mode():
        correct = sum(int((model(xb).argmax(1) == yb).sum())
                      for xb, yb in zip(x.split(batch), y.split(batch), strict=True))
    return correct / x.shape[0]


Row = TypeVar("Row")


def repeat_order(contenders: list[Row], repeat: int, seed: int) -> list[Row]:
    """The order the contenders run in during one repeat: a permutation drawn from ``(seed, repeat)``.

    A rotation by one per repeat spreads the positions but keeps each contender behind the same
    predecessor, whose leftovers (freed memory, caches, the allocator's state) it then always
    inherits; a fresh permutation per repeat changes both, and the same seed gives the same orders.
    """
    order = list(contenders)
    random.Random(f"{seed}:{repeat}").shuffle(order)
    return order


def check_repeats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every benchmark reports medians: fewer than 5 repeats is refused."""
    if args.repeats < 5:
        parser.error("--repeats must be >= 5: a median of fewer runs says little")


def median(values: list[float]) -> float:
    return statistics.median(values)


# fortify's training rows: name -> (row label, TrainConfig settings over the benchmark's own).
# "default" is the Trainer as it comes (on CPU: fp32, channels_last where the model runs so, linear
# layers on oneDNN where that pays); "nchw" trains in the layout ART's rows train in; "torch-linear"
# keeps torch's own linear layers (VARIANT_ENVIRONMENT); "fast" adds bf16 autocast
FORTIFY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("fortify", {}),
    "nchw": ("fortify NCHW", {"channels_last": False}),
    "torch-linear": ("fortify torch linear", {}),
    "fast": ("fortify bf16 channels_last", {"amp": True, "channels_last": True}),
    # the learning rate and clipping ART's FBF trainer sets itself (a triangle peaking at 0.21, gradient
    # norm clipped to 0.5), so that fgsm-rs's accuracy columns compare the libraries, not the recipes.
    # One triangle over the run: ART's when its fit runs every epoch in one call (training_throughput,
    # training_accuracy), not when it is called once per epoch (time_to_target: a saw-tooth)
    "fbf-schedule": ("fortify, cyclic lr 0.21 + clip 0.5",
                     {"schedule": "cyclic", "lr": 0.21, "grad_clip": 0.5}),
}
# environment variables a variant's Trainer is built under
VARIANT_ENVIRONMENT: dict[str, dict[str, str]] = {"torch-linear": {ONEDNN_LINEAR_VARIABLE: "0"}}


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """``--variants`` (fortify's rows) and ``--art-channels-last`` for the training benchmarks."""
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(FORTIFY_VARIANTS),
                        help=f"fortify's rows, comma separated, from {', '.join(FORTIFY_VARIANTS)} "
                             "('fast' is left out on a CPU without oneDNN bf16 kernels); the first "
                             "one is the baseline of the time ratios")
    parser.add_argument("--art-channels-last", action="store_true",
                        help="also run ART's trainers on the model with channels_last weights")


def check_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = [v for v in args.variants if v not in FORTIFY_VARIANTS]
    if unknown or not args.variants:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(FORTIFY_VARIANTS)}")
    if "fast" in args.variants and not cpu_has_kernels_for("bf16"):
        print("note: the 'fast' rows (bf16 autocast) are left out: this CPU has no oneDNN bf16 kernels, "
              "where they would time torch's reference convolutions")
        args.variants = [v for v in args.variants if v != "fast"] or ["default"]


def trainer_rows(args: argparse.Namespace, pairs: tuple[tuple[str, str], ...],
                 group_of: Callable[[str], str], fortify_trainer: Callable[[str, dict[str, Any]], Any],
                 art_trainer: Callable[[str, bool], Any]) -> list[tuple[str, str, Any]]:
    """``(group, library, train function)`` per objective in ``args.objectives``, for the training
    benchmarks: fortify's ``--variants`` (the first is the ratios' baseline), then ART's matching
    trainer (also on channels_last weights with ``--art-channels-last``) unless ``--no-art`` or ART
    is not importable."""
    rows = []
    for objective, art_name in pairs:
        if objective not in args.objectives:
            continue
        group = group_of(objective)
        for variant in args.variants:
            label, settings = FORTIFY_VARIANTS[variant]
            environment = VARIANT_ENVIRONMENT.get(variant, {})
            train = under_environment(fortify_trainer(objective, settings), environment)
            rows.append((group, label, train))
        if args.no_art:
            continue
        try:
            import art  # noqa: F401
        except ImportError as err:
            print(f"note: ART skipped, not importable ({err})")
            continue
        rows.append((group, f"ART {art_name}", art_trainer(objective, False)))
        if args.art_channels_last:
            rows.append((group, f"ART {art_name} {CPU_KERNELS}", art_trainer(objective, True)))
    return rows


def under_environment(run: Callable[..., None], environment: dict[str, str]) -> Callable[..., None]:
    """``run`` with ``environment`` set for each call, and the variables as they were afterwards."""
    if not environment:
        return run

    def wrapped(*args: Any) -> None:
        before = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        try:
            run(*args)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return wrapped


# -- provenance --------------------------------------------------------------------------------


def git_commit() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (+ uncommitted changes in src/)" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def package_version(module: str, label: str | None = None) -> str:
    """``"<label> <version>"`` from the installed distribution ``label`` (default ``module``), or
    ``"<label> not installed"``. Read from the package metadata, not by importing ``module``: an import
    changes the process (ART's reconfigures logging and closes the handlers other libraries made,
    absl's among them, which closed the stream absl had taken for stderr)."""
    label = label or module
    try:
        return f"{label} {importlib.metadata.version(label)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{label} not installed"


_ALLOCATOR = "glibc malloc with its default thresholds"


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="raise glibc's malloc thresholds for the whole process, i.e. for every "
                             "contender, as the fortify CLI does by default (FORTIFY_KEEP_FREED_MEMORY) "
                             "(fortify.allocator)")


def apply_process_options(args: argparse.Namespace) -> None:
    """The process-wide settings, before any work: ``--threads`` and ``--keep-freed-memory`` (which
    the header's ``malloc:`` line then reports)."""
    global _ALLOCATOR
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        kept = keep_freed_memory()
        _ALLOCATOR = ("freed memory kept for every contender (fortify.allocator.keep_freed_memory)" if kept
                      else "glibc defaults (--keep-freed-memory needs glibc; this C library is another)")


def print_provenance(peers: list[tuple[str, str]]) -> None:
    """Date, commit, machine, library versions and load: the first lines of every header."""
    versions = [f"torch {torch.__version__}"] + [package_version(m, label) for m, label in peers]
    print(f"date:     {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"commit:   {git_commit()}")
    print(f"machine:  {cpu_model()}, {torch.get_num_threads()} torch threads "
          f"(of {torch.multiprocessing.cpu_count()} logical CPUs)")
    print(f"versions: {', '.join(versions)}, Python {platform.python_version()}")
    print(f"malloc:   {_ALLOCATOR}")
    print(f"load:     {load_average()} (1/5/15-minute load average at start)")
