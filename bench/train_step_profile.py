"""One small-cnn training step on CPU, alone: milliseconds per step and where the time goes.

The step of fortify's standard objective with its speed switches (bf16 autocast, channels_last
weights and inputs, the `nn.Flatten` gradient hook), in a bare loop at batch 64 without the
Trainer around it: forward, cross-entropy, backward, SGD with momentum. The script prints the
median time per step over several blocks of steps and the operators that the torch profiler
charges most, per call. Two runs of it in two processes show how much separate processes on the
same machine differ; `--keep-freed-memory` shows the allocator's share; `--compile` times the same
step with the model under `torch.compile` (what `train.compile` does), interleaved block by block
with an eager copy, and prints the compilation time; `--implicit-bf16` runs the step in fp32 with
oneDNN doing its convolutions and matrix products in bf16 inside (no autocast casts);
`--trainer` prices what fortify's Trainer adds around the step: it times `Trainer.fit` for E and 2E
epochs on digits (their difference is E epochs without the fixed cost of a fit) against a bare loop
of the same steps over shuffled digits batches, alternating.

    .venv/bin/python bench/train_step_profile.py --threads 1
    .venv/bin/python bench/train_step_profile.py --threads 1 --compile
    .venv/bin/python bench/train_step_profile.py --threads 1 --trainer
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import profile

from _common import NUM_CLASSES, add_allocator_option, apply_process_options, print_provenance
from fortify.config import TrainConfig
from fortify.data import load_dataset
from fortify.data.base import Split
from fortify.models import build_model
from fortify.models.layout import channels_last
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="without bf16 autocast")
    parser.add_argument("--implicit-bf16", action="store_true",
                        help="fp32 step with oneDNN's convolutions and matrix products in bf16 inside "
                             "(torch.backends.mkldnn.*.fp32_precision) instead of autocast")
    parser.add_argument("--top", type=int, default=8, help="operators to list")
    parser.add_argument("--compile", action="store_true",
                        help="compare against the same step under torch.compile instead of profiling")
    parser.add_argument("--trainer", action="store_true",
                        help="compare fortify's Trainer (per epoch, per fit) with a bare loop of its steps")
    parser.add_argument("--epochs", type=int, default=3, help="E for --trainer: fits of E and 2E epochs")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_process_options(args)
    if args.implicit_bf16:
        args.fp32 = True
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    x = torch.rand(args.batch, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    if args.compile:
        compare_compiled(args, x, y)
        return
    if args.trainer:
        compare_trainer(args)
        return
    model, step = training_step(args, x, y)
    print_provenance([])
    print(f"setting:  small-cnn, batch {args.batch}, {_precision(args)}, "
          f"channels_last with the Flatten hook; {args.blocks} blocks of {args.steps} steps\n")
    with channels_last(model):
        for _ in range(20):  # warm-up
            step()
        blocks = []
        for _ in range(args.blocks):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            blocks.append((time.perf_counter() - start) / args.steps)
        with profile() as prof:
            for _ in range(args.steps // 4):
                step()
    print(f"ms per step: median {statistics.median(blocks) * 1e3:.2f} "
          f"(blocks {', '.join(f'{b * 1e3:.2f}' for b in blocks)})\n")
    print("| operator | calls per step | us per call | share of the profiled time |")
    print("|---|---:|---:|---:|")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for event in events[:args.top]:
        print(f"| {event.key} | {event.count / (args.steps // 4):.3g} | "
              f"{event.self_cpu_time_total / event.count:.1f} | {event.self_cpu_time_total / total:.1%} |")


def _precision(args: argparse.Namespace) -> str:
    if args.implicit_bf16:
        return "fp32 with oneDNN's implicit bf16"
    return "fp32" if args.fp32 else "bf16 autocast"


def training_step(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, compiled: bool = False
                  ) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A fresh small-cnn (seed 0, the same weights every time) and one SGD step of it on ``(x, y)``."""
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), NUM_CLASSES).train()
    forward = torch.compile(model) if compiled else model
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = F.cross_entropy(forward(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model, step


def compare_compiled(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    """Eager against compiled, in alternating blocks of steps; the first compiled step compiles."""
    eager_model, eager = training_step(args, x, y)
    compiled_model, compiled = training_step(args, x, y, compiled=True)
    print_provenance([])
    print(f"setting:  small-cnn, batch {args.batch}, {_precision(args)}, "
          f"channels_last with the Flatten hook, eager against torch.compile (Inductor); "
          f"{args.blocks} alternating blocks of {args.steps} steps each\n")
    with channels_last(eager_model), channels_last(compiled_model):
        start = time.perf_counter()
        compiled()
        print(f"first compiled step (compilation): {time.perf_counter() - start:.1f} s")
        for _ in range(20):  # warm-up
            eager()
            compiled()
        blocks: dict[str, list[float]] = {"eager": [], "compiled": []}
        for block in range(args.blocks):
            order = (("eager", eager), ("compiled", compiled))
            for name, step in order if block % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                blocks[name].append((time.perf_counter() - start) / args.steps)
    eager_ms, compiled_ms = (statistics.median(blocks[k]) * 1e3 for k in ("eager", "compiled"))
    print(f"ms per step: eager {eager_ms:.2f}, compiled {compiled_ms:.2f} "
          f"(compiled / eager {compiled_ms / eager_ms:.2f})")


def compare_trainer(args: argparse.Namespace) -> None:
    """``Trainer.fit`` of E and 2E epochs (standard objective, digits) against a bare loop of E
    epochs of the same steps, in alternating rounds: the per-epoch cost of the Trainer is the
    difference of its two fits over E, its fixed cost per fit what is left of the E-epoch fit."""
    train = load_dataset("digits").train
    print_provenance([])
    print(f"setting:  small-cnn on digits ({len(train.y)} training examples), batch {args.batch}, "
          f"{_precision(args)}, channels_last; Trainer.fit of {args.epochs} and {2 * args.epochs} epochs "
          f"against {args.epochs} bare epochs, {args.blocks} alternating rounds\n")
    contenders = {f"fit {args.epochs}": lambda: _fit(args, train, args.epochs),
                  f"fit {2 * args.epochs}": lambda: _fit(args, train, 2 * args.epochs),
                  f"bare {args.epochs}": _bare_epochs(args, train)}
    for run in contenders.values():  # warm-up: oneDNN builds its primitives on first use
        run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for block in range(args.blocks):
        order = list(contenders.items())
        for name, run in order if block % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    short, long, bare = (statistics.median(seconds[name]) * 1e3 for name in contenders)
    per_epoch = (long - short) / args.epochs
    print(f"ms per epoch: Trainer {per_epoch:.2f}, bare loop {bare / args.epochs:.2f} "
          f"(Trainer / bare {per_epoch * args.epochs / bare:.3f}); the Trainer's fixed cost per fit "
          f"{short - per_epoch * args.epochs:.2f} ms")


def _fit(args: argparse.Namespace, train: Split, epochs: int) -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), NUM_CLASSES)
    threat = ThreatModel("linf", 0.2)
    config = TrainConfig(objective="standard", epochs=epochs, batch_size=args.batch, lr=0.05, momentum=0.9,
                         weight_decay=0.0, schedule="constant", early_stopping=False, seed=0,
                         amp=not args.fp32, channels_last=True)
    # a validation split of 8 examples, as in bench/training_throughput.py
    Trainer(model, build_objective("standard", ObjectiveOptions(threat)), config, threat=threat,
            show_progress=False).fit(train, Split(train.x[:8], train.y[:8]))


def _bare_epochs(args: argparse.Namespace, train: Split) -> Callable[[], None]:
    """E epochs of the bare step over shuffled batches of ``train``, on one model kept channels_last
    (with the Flatten gradient hook, as the Trainer runs it) for the rest of the process."""
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 8, 8), NUM_CLASSES).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    shuffle = torch.Generator().manual_seed(0)
    layout = channels_last(model)
    layout.__enter__()  # never left: the model is this loop's alone

    def run() -> None:
        for _ in range(args.epochs):
            order = torch.randperm(len(train.y), generator=shuffle)
            for rows in order.split(args.batch):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                    loss = F.cross_entropy(model(train.x[rows]).float(), train.y[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    run.layout = layout  # type: ignore[attr-defined]  # held: a collected context would restore the layout
    return run


if __name__ == "__main__":
    main()
