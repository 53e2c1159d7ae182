"""Fast adversarial training (fgsm-rs) of PreAct ResNet-18 on CIFAR-10-shaped data, on one GPU.

Four parts, in one process (``--parts``):

- ``peak``: the GPU's bf16 peak in the same run, the better of a large matrix product (2 n^3 FLOPs)
  and a large channels_last 3x3 convolution (FLOPs counted by ``torch.utils.flop_counter``), each
  the median of timed repeats after warm-ups.
- ``steps``: fortify's Trainer step (``Trainer._train_step``: the fgsm-rs objective, backward, fused
  SGD) at several batch sizes, per variant: ``fp32``; ``bf16-cl`` (``train.amp`` with
  ``train.channels_last``); ``bf16-cl-compile`` (and ``train.compile: true``);
  ``bf16-cl-cudagraphs`` (and ``train.compile: reduce-overhead``, CUDA graphs);
  ``bf16-cl-step-graph`` (``train.cuda_graph``: the eager step recorded whole as one CUDA graph,
  nothing compiled). Images per second,
  the step's counted FLOPs, achieved TFLOP/s and the fraction of the peak (when ``peak`` ran).
- ``profile``: torch.profiler over ten steps of each step variant at the first batch size: aten
  operators per step, host syncs and copies, and the operators by CPU time.
- ``recipe``: Wong et al.'s 15-epoch recipe (batch 128, SGD with momentum 0.9 and weight decay 5e-4,
  cyclic learning rate peaking at 0.2, random crop with padding 4 and flips, eps 8/255, FGSM step
  10/255 from a uniform start) through ``Trainer.fit``, PGD-10 validation on 1,000 images after
  every epoch included: wall seconds from the call to its return, per epoch, and the final
  validation accuracies. ``bf16-cl-host-data`` cuts the batches from host memory as the Trainer did
  before it kept a training split that fits on the GPU.

Timing drains the GPU (``torch.cuda.synchronize``) before reading the host clock. The data are
synthetic (nothing to download): images whose class sets a smooth colour pattern under
per-image noise. Timing needs no real images; the accuracies only show that training ran.

    python bench/gpu_fast_at.py                                 # peak, steps and recipe on cuda
    python bench/gpu_fast_at.py --parts peak,steps --step-variants fp32,bf16-cl,bf16-cl-compile
    python bench/gpu_fast_at.py --parts profile --batches 128 --step-variants bf16-cl
    python bench/gpu_fast_at.py --parts recipe --recipe-variants bf16-cl-host-data,bf16-cl
    python bench/gpu_fast_at.py --device cpu --train-size 512 --epochs 1 --batches 32 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _common import check_repeats
from fortify.config import AugmentConfig, TrainConfig
from fortify.data.base import Split
from fortify.models import build_model
from fortify.models.layout import flatten_gradient_hooks
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.step_graph import StepGraph
from fortify.training.trainer import Trainer
from roofline import counted_flops

SHAPE = (3, 32, 32)
CLASSES = 10
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
EPS = 8 / 255


@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool | str  # train.compile: False, True or a torch.compile mode
    host_data: bool = False  # recipe only: batches cut from host memory, as before the Trainer kept
    #                          the training split on the GPU (Trainer._keep_on_gpu)
    cuda_graph: bool = False  # train.cuda_graph: the eager step recorded once as a CUDA graph


VARIANTS = {v.name: v for v in (
    Variant("fp32", amp=False, channels_last=False, compile=False),
    Variant("bf16-cl", amp=True, channels_last=True, compile=False),
    Variant("bf16-cl-host-data", amp=True, channels_last=True, compile=False, host_data=True),
    Variant("bf16-cl-compile", amp=True, channels_last=True, compile=True),
    Variant("bf16-cl-cudagraphs", amp=True, channels_last=True, compile="reduce-overhead"),
    Variant("bf16-cl-step-graph", amp=True, channels_last=True, compile=False, cuda_graph=True),
)}


# -- timing ------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(work: Callable[[], object], repeats: int, device: torch.device, warmup: int = 3
                  ) -> list[float]:
    """Wall seconds of ``work`` after ``warmup`` untimed calls, the device drained around each."""
    for _ in range(warmup):
        work()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


# -- the data ----------------------------------------------------------------------------------

def synthetic_cifar(n: int, seed: int) -> Split:
    """``n`` images in [0, 1]: a smooth per-class colour pattern (4x4 upsampled) plus noise.

    An easy task (PreAct ResNet-18 reaches 100% clean and PGD-10 accuracy on it within the recipe):
    it shows that training ran, not how robust the recipe makes a model.
    """
    patterns_gen = torch.Generator().manual_seed(12345)  # the same classes in every split
    patterns = F.interpolate(torch.rand(CLASSES, 3, 4, 4, generator=patterns_gen), size=SHAPE[1:],
                             mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    noise = torch.randn(n, *SHAPE, generator=gen)
    x = (0.25 + 0.5 * patterns[y] + 0.25 * noise).clamp_(0.0, 1.0)
    return Split(x, y)


def fresh_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("preact-resnet18", SHAPE, CLASSES, mean=CIFAR_MEAN, std=CIFAR_STD).to(device)


# -- peak ----------------------------------------------------------------------------------------

def bf16_peak(device: torch.device, n: int, repeats: int) -> tuple[float, float]:
    """bf16 TFLOP/s of an n^3 matrix product and of a 256-channel 3x3 convolution (median)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    matmul = 2 * n ** 3 / statistics.median(timed_seconds(lambda: a @ b, repeats, device)) / 1e12
    x = torch.randn(256, 256, 32, 32, device=device, dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(256, 256, 3, 3, device=device, dtype=torch.bfloat16, generator=gen)
    x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    conv = lambda: F.conv2d(x, weight, padding=1)  # noqa: E731
    conv_rate = counted_flops(conv) / statistics.median(timed_seconds(conv, repeats, device)) / 1e12
    return matmul, conv_rate


# -- steps ---------------------------------------------------------------------------------------

def trainer_for(variant: Variant, config: TrainConfig, device: torch.device) -> Trainer:
    model = fresh_model(device)
    threat = ThreatModel("linf", EPS)
    objective = build_objective(config.objective, ObjectiveOptions(threat, seed=config.seed))
    trainer = Trainer(model, objective, config, threat=threat, show_progress=False)
    if variant.host_data:
        trainer._keep_on_gpu = lambda split: split  # type: ignore[method-assign]
    return trainer


def step_config(variant: Variant, batch: int) -> TrainConfig:
    return TrainConfig(objective="fgsm-rs", batch_size=batch, lr=0.01, schedule="constant",
                       amp=variant.amp, channels_last=variant.channels_last, compile=variant.compile,
                       cuda_graph=variant.cuda_graph)


def step_for(variant: Variant, trainer: Trainer, batch: int) -> Callable[..., object]:
    """The Trainer's step, or for ``cuda_graph`` variants that step recorded and replayed as the
    Trainer does it (``StepGraph``)."""
    if not variant.cuda_graph:
        return trainer._train_step
    return StepGraph(trainer._train_step, batch_size=batch, optimizer=trainer.optimizer,
                     device=trainer.device, generators=[trainer.objective.generator(trainer.device)])


def first_steps(variant: Variant, step: Callable[..., object], x: torch.Tensor, y: torch.Tensor) -> None:
    """The steps before the timed ones: one (which compiles under ``train.compile``), or the step
    graph's warm-up steps and the one it is recorded on."""
    for _ in range(StepGraph.WARMUP_STEPS + 1 if variant.cuda_graph else 1):
        step(x, y)


def time_steps(variant: Variant, batch: int, steps: int, repeats: int, device: torch.device,
               flops: int | None) -> dict[str, float]:
    trainer = trainer_for(variant, step_config(variant, batch), device)
    data = synthetic_cifar(batch, seed=1)
    x, y = data.x.to(device), data.y.to(device)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer._warm_eps(1.0)  # full eps, as after warm-up
    hooks = flatten_gradient_hooks(trainer.model) if variant.channels_last else contextlib.nullcontext()

    step = step_for(variant, trainer, batch)

    def run() -> None:
        for _ in range(steps):
            step(x, y)

    with hooks:
        compile_start = time.perf_counter()
        first_steps(variant, step, x, y)  # compiled, or warmed up and recorded
        synchronize(device)
        first = time.perf_counter() - compile_start
        seconds = timed_seconds(run, repeats, device, warmup=1)
        if flops is None:
            eager = not (variant.compile or variant.cuda_graph)
            flops = counted_flops(lambda: trainer._train_step(x, y)) if eager else 0
    per_step = statistics.median(seconds) / steps
    return {"per_step": per_step, "best": min(seconds) / steps, "worst": max(seconds) / steps,
            "images_per_s": batch / per_step, "flops": float(flops), "first_step": first}


def profile_step(variant: Variant, batch: int, device: torch.device, steps: int = 10) -> None:
    """CPU time per step, the operators launched and the host syncs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    trainer = trainer_for(variant, step_config(variant, batch), device)
    data = synthetic_cifar(batch, seed=1)
    x, y = data.x.to(device), data.y.to(device)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer._warm_eps(1.0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    hooks = flatten_gradient_hooks(trainer.model) if variant.channels_last else contextlib.nullcontext()
    step = step_for(variant, trainer, batch)
    with hooks:
        for _ in range(3):
            first_steps(variant, step, x, y)
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step(x, y)
            synchronize(device)
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    syncs = {e.key: e.count / steps for e in events
             if any(k in e.key for k in ("Synchronize", "_local_scalar_dense", "cudaMemcpy", "item"))}
    print(f"\nprofile {variant.name}, batch {batch}: {aten:.0f} aten operators per step; "
          f"host syncs and copies per step: {syncs}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))


# -- recipe --------------------------------------------------------------------------------------

def recipe_config(variant: Variant, epochs: int) -> TrainConfig:
    return TrainConfig(objective="fgsm-rs", epochs=epochs, batch_size=128, optimizer="sgd", lr=0.2,
                       momentum=0.9, weight_decay=5e-4, schedule="cyclic", early_stopping=False,
                       val_attack_steps=10, augment=AugmentConfig(crop_padding=4, flip=True),
                       amp=variant.amp, channels_last=variant.channels_last, compile=variant.compile,
                       cuda_graph=variant.cuda_graph)


def run_recipe(variant: Variant, epochs: int, train: Split, val: Split, device: torch.device
               ) -> dict[str, object]:
    trainer = trainer_for(variant, recipe_config(variant, epochs), device)
    synchronize(device)
    start = time.perf_counter()
    result = trainer.fit(train, val)
    synchronize(device)
    wall = time.perf_counter() - start
    last = result.history[-1]
    return {"wall": wall, "epochs": [round(r.seconds, 2) for r in result.history],
            "clean": last.val_clean_accuracy, "robust": last.val_robust_accuracy}


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="peak,steps,recipe", help="of peak, steps, profile, recipe")
    parser.add_argument("--batches", default="128,512", help="batch sizes of the steps part")
    parser.add_argument("--step-variants",
                        default="fp32,bf16-cl,bf16-cl-compile,bf16-cl-cudagraphs,bf16-cl-step-graph")
    parser.add_argument("--steps", type=int, default=20, help="train steps in one timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=8192)
    parser.add_argument("--recipe-variants",
                        default="bf16-cl-host-data,bf16-cl,bf16-cl-cudagraphs,bf16-cl-step-graph")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--val-size", type=int, default=1_000)
    args = parser.parse_args(argv)
    check_repeats(parser, args)
    for name in (*args.step_variants.split(","), *args.recipe_variants.split(",")):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    if not args.device.startswith("cuda"):  # train.cuda_graph records CUDA graphs
        for key in ("step_variants", "recipe_variants"):
            names = getattr(args, key).split(",")
            kept = [name for name in names if not VARIANTS[name].cuda_graph]
            if not kept:
                parser.error(f"{key.replace('_', '-')}: train.cuda_graph variants need a CUDA device")
            if len(kept) < len(names):
                print(f"skipped on {args.device}: {', '.join(sorted(set(names) - set(kept)))}")
            setattr(args, key, ",".join(kept))
    return args


def print_header(device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device:   {name}; torch {torch.__version__}; "
          f"cuda {torch.version.cuda}; cudnn {torch.backends.cudnn.version()}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    print_header(device)
    peak = None
    if "peak" in parts:
        matmul, conv = bf16_peak(device, args.matmul, args.repeats)
        peak = max(matmul, conv)
        print(f"peak:     {peak:.1f} TFLOP/s bf16 (matrix product {args.matmul}^3: {matmul:.1f}; "
              f"3x3 convolution 256x256x32x32, 256 channels, channels_last: {conv:.1f}), medians",
              flush=True)
    if "steps" in parts:
        print("\n| variant | batch | ms per step (median) | min-max ms | images/s | GFLOP per step "
              "| TFLOP/s | of bf16 peak | first step s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch in (int(b) for b in args.batches.split(",")):
            flops = None
            for name in args.step_variants.split(","):
                row = time_steps(VARIANTS[name], batch, args.steps, args.repeats, device, flops)
                flops = int(row["flops"]) or flops  # the eager count serves the compiled variant
                rate = (flops or 0) / row["per_step"] / 1e12
                share = f"{rate / peak:.1%}" if peak else "-"
                print(f"| {name} | {batch} | {row['per_step'] * 1e3:.2f} | {row['best'] * 1e3:.2f}-"
                      f"{row['worst'] * 1e3:.2f} | {row['images_per_s']:,.0f} | {(flops or 0) / 1e9:.1f} "
                      f"| {rate:.1f} | {share} | {row['first_step']:.1f} |", flush=True)
    if "profile" in parts:
        for name in args.step_variants.split(","):
            profile_step(VARIANTS[name], int(args.batches.split(",")[0]), device)
    if "recipe" in parts:
        train = synthetic_cifar(args.train_size, seed=2)
        val = synthetic_cifar(args.val_size, seed=3)
        print(f"\nrecipe: {args.epochs} epochs of fgsm-rs on {len(train):,} synthetic images, "
              f"PGD-10 validation on {len(val):,} after each epoch")
        for name in args.recipe_variants.split(","):
            row = run_recipe(VARIANTS[name], args.epochs, train, val, device)
            print(f"{name}: {row['wall']:.1f} s wall; epochs (s, validation included) {row['epochs']}; "
                  f"final val clean {row['clean']:.1%}, PGD-10 {row['robust']:.1%}", flush=True)


if __name__ == "__main__":
    main()
