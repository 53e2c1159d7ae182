"""How close fortify's PGD and training steps come to the machine's peak, in GFLOP/s.

In one process: the peak is the best rate of a large float32 matrix product (2*n^3 FLOPs; torch's
own route, MKL on CPU, and oneDNN's linear kernel, which fortify's CPU linear layers call) or a
large convolution (in NCHW and in channels_last), measured before and after the workloads; each
workload's FLOPs are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products and convolutions, forward and backward) and its wall time is the median of several
repeats. Achieved GFLOP/s = counted FLOPs / median time; fraction of peak = that / peak.

    .venv/bin/python bench/roofline.py --threads 1 --repeats 7
    .venv/bin/python bench/roofline.py --model preact-resnet18 --shape 3,32,32 --batch 32
    .venv/bin/python bench/roofline.py --threads 1 --repeats 7 --amp

Workloads: one PGD-K attack call (K steps, each a forward and an input-gradient pass; reported per step),
and one training step (objective, backward, SGD step) of the standard, fgsm-rs and pgd objectives.
``--channels-last`` runs them with channels_last weights and inputs in float32, as training and
evaluation on CPU do by default, and times them with the linear layers on oneDNN where fortify
runs them so (``fortify.models.onednn_linear``; the FLOPs are counted on torch's layers, whose
products the counter sees). ``--amp`` runs them as fortify's fast path does (``train.amp``,
``eval.amp``): the model in channels_last, its passes under bf16 autocast; the peak is then
measured in bf16 (matrix product of bf16 tensors, bf16 convolution in channels_last).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import NUM_CLASSES, check_repeats, load_average, print_provenance
from fortify.attacks import PGD
from fortify.evaluation.precision import AutocastModel
from fortify.models import build_model
from fortify.models.layout import channels_last
from fortify.models.onednn_linear import onednn_linear, onednn_linear_pays
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective


def timed(work: Callable[[], object], repeats: int,
          kernels: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``work`` (after one warm-up), under ``kernels()``."""
    with kernels():
        work()  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - start)
    return seconds


class _GlobalTotalsOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the global total.

    The tracker's backward hooks make ``torch.autograd.grad`` with respect to a leaf input (what
    PGD does) fail inside FlopCounterMode; the totals need no per-module attribution.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def counted_flops(work: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalTotalsOnly()  # type: ignore[assignment]
    with counter:
        work()
    return counter.get_total_flops()


def matmul_gflops(n: int, repeats: int, dtype: torch.dtype) -> float:
    """Best rate of an n x n matrix product, by torch's own route (MKL in float32 on CPU, oneDNN in
    bf16) and by oneDNN's linear kernel where torch has it: on AMD CPUs with AVX-512, MKL takes its
    AVX2 path and oneDNN's float32 product runs about twice its rate, so a peak taken from MKL alone
    would understate the machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    routes: list[Callable[[], object]] = [lambda: a @ b]
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        routes.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return max(2 * n ** 3 / min(timed(route, repeats)) / 1e9 for route in routes)


def conv_gflops(repeats: int, dtype: torch.dtype) -> float:
    """Best rate of a large 3x3 convolution (oneDNN) in NCHW and in channels_last, counted as direct
    convolution.

    On some CPUs the convolution library beats the matrix product library, so the peak takes the
    better of the two; a convolution done with fewer arithmetic operations than the direct count
    would overstate it, which is why the count uses the same FlopCounterMode as the workloads. Both
    layouts, since the workloads run in either (float32 channels_last ran at 1.33x NCHW's rate on
    an AMD EPYC with AVX-512; bf16 wants channels_last).
    """
    x, weight = torch.randn(64, 256, 16, 16, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
    rates = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, wl = (t.contiguous(memory_format=layout) for t in (x, weight))
        work = functools.partial(torch.nn.functional.conv2d, xl, wl, padding=1)
        rates.append(counted_flops(work) / min(timed(work, repeats)) / 1e9)
    return max(rates)


def peak_gflops(n: int, repeats: int, dtype: torch.dtype) -> tuple[float, float]:
    return matmul_gflops(n, repeats, dtype), conv_gflops(repeats, dtype)


def pgd_work(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             steps: int) -> Callable[[], object]:
    attack = PGD(threat, steps=steps, step_size=2.5 * threat.eps / steps, random_start=True, seed=0)
    return lambda: attack(model, x, y)


def training_work(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  objective_name: str, steps: int, amp: bool) -> Callable[[], object]:
    """One step as fortify's Trainer takes it, under bf16 autocast when ``amp``."""
    objective = build_objective(objective_name, ObjectiveOptions(threat, attack_steps=steps))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = objective(model, x, y)
        loss.backward()
        optimizer.step()
    return step


@dataclass
class Row:
    name: str
    flops: int
    seconds: list[float]
    per: int  # steps in one timed call


def print_row(row: Row, peak: float) -> None:
    median, best = statistics.median(row.seconds), min(row.seconds)
    rate, best_rate = row.flops / median / 1e9, row.flops / best / 1e9
    print(f"| {row.name} | {row.flops / row.per / 1e6:,.1f} | {median / row.per * 1e3:.2f} | "
          f"{best / row.per * 1e3:.2f}-{max(row.seconds) / row.per * 1e3:.2f} | {rate:.1f} | "
          f"{best_rate:.1f} | {rate / peak:.0%} | {best_rate / peak:.0%} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--shape", type=lambda s: tuple(int(d) for d in s.split(",")), default=(1, 8, 8),
                        help="input shape (default: the digits images)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (attack and pgd objective)")
    parser.add_argument("--matmul", type=int, default=2048, help="size of the peak matrix product")
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast and channels_last, against a bf16 peak")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last weights and inputs in float32 (what training and evaluation "
                             "on CPU do by default); --amp implies it")
    args = parser.parse_args(argv)
    check_repeats(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, args.shape, NUM_CLASSES)
    x = torch.rand((args.batch, *args.shape), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=torch.Generator().manual_seed(1))
    threat = ThreatModel("linf", args.eps)
    dtype = torch.bfloat16 if args.amp else torch.float32
    use_channels_last = (args.amp or args.channels_last) and x.dim() == 4
    attacked: torch.nn.Module = model
    if use_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if args.amp:
        attacked = AutocastModel(model, "bf16", torch.device("cpu"))
    print_provenance([])
    # the weights channels_last with the nn.Flatten gradient hook, as fortify's Trainer and attacks have them
    layout = channels_last(model) if use_channels_last else contextlib.nullcontext()
    # fp32 linear layers as fortify's Trainer and evaluation run them on this CPU, for the timing only:
    # FlopCounterMode counts torch's matrix products, not oneDNN's
    onednn = use_channels_last and not args.amp and onednn_linear_pays(torch.device("cpu"))
    kernels = (lambda: onednn_linear(model)) if onednn else contextlib.nullcontext
    with layout:
        rows, first_peak, last_peak = measure(args, model, attacked, x, y, threat, dtype, kernels)
    # on a shared machine other work slows these too: the best of the four rates is the peak
    peak = max(*first_peak, *last_peak)
    precision = "bf16 autocast, channels_last" if args.amp else (
        "float32, channels_last" if use_channels_last else "float32") + (", oneDNN linear" if onednn else "")
    print(f"setting:  {args.model} on random inputs {'x'.join(map(str, args.shape))}, batch {args.batch}, "
          f"{precision}; {threat.describe()}; PGD-{args.steps}")
    print(f"peak:     {peak:.1f} GFLOP/s: best of {args.repeats} {dtype} {args.matmul}x{args.matmul} matrix "
          f"products (torch's and oneDNN's) / 256-channel 3x3 convolutions (NCHW and channels_last), "
          f"before ({first_peak[0]:.1f} / {first_peak[1]:.1f}) "
          f"and after ({last_peak[0]:.1f} / {last_peak[1]:.1f}) the workloads")
    print()
    print("| workload | MFLOP per step | median ms per step | min-max ms | GFLOP/s (median) "
          "| GFLOP/s (best) | of peak (median) | of peak (best) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print_row(row, peak)
    print(f"\nload at end: {load_average()}")


def measure(args: argparse.Namespace, model: torch.nn.Module, attacked: torch.nn.Module, x: torch.Tensor,
            y: torch.Tensor, threat: ThreatModel, dtype: torch.dtype,
            kernels: Callable[[], contextlib.AbstractContextManager]
            ) -> tuple[list[Row], tuple[float, float], tuple[float, float]]:
    """The peak before, the workloads' rows, the peak after."""
    first_peak = peak_gflops(args.matmul, args.repeats, dtype)
    model.eval()
    attack = pgd_work(attacked, x, y, threat, args.steps)
    # K steps of one forward and one input-gradient pass each (one restart has no judging pass since 4823ae3)
    rows = [Row(f"PGD-{args.steps} attack (per step)", counted_flops(attack),
                timed(attack, args.repeats, kernels), args.steps)]
    for objective in ("standard", "fgsm-rs", "pgd"):
        step = training_work(model, x, y, threat, objective, args.steps, args.amp)
        label = f"{objective}-{args.steps}" if objective == "pgd" else objective
        rows.append(Row(f"train step, {label}", counted_flops(step), timed(step, args.repeats, kernels), 1))
    last_peak = peak_gflops(args.matmul, args.repeats, dtype)
    return rows, first_peak, last_peak


if __name__ == "__main__":
    main()
