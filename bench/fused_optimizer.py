"""The Trainer's fused SGD against torch's per-tensor SGD, on the fast small-cnn training step.

Two copies of small-cnn (same initial weights) train side by side in this one process: one steps
with ``torch.optim.SGD(..., fused=True)``, as fortify's Trainer does on CPU and CUDA, the other with
the per-tensor loop (``foreach=False``), torch's default for CPU tensors. Each step is the fast
standard step (bf16 autocast, channels_last weights and inputs, the ``nn.Flatten`` gradient hook,
batch 64). Blocks of steps alternate between the two, so a machine that slows down for a while
slows both; the script prints each one's median milliseconds per step and the median of the
per-round ratios.

    .venv/bin/python bench/fused_optimizer.py --threads 1 --rounds 31
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _common import NUM_CLASSES, add_allocator_option, apply_process_options, print_provenance
from fortify.models import build_model
from fortify.models.layout import flatten_gradient_hooks, to_channels_last

VARIANTS = {"per-tensor SGD": {"foreach": False}, "fused SGD": {"fused": True}}


def training_step(options: dict[str, bool], x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.nn.Module, Callable[[], None]]:
    torch.manual_seed(0)
    model = build_model("small-cnn", tuple(x.shape[1:]), NUM_CLASSES).train()
    to_channels_last(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, **options)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per block")
    parser.add_argument("--rounds", type=int, default=31, help="blocks per variant, alternating")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_process_options(args)
    x = torch.rand(args.batch, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    print_provenance([])
    print(f"setting:  small-cnn, batch {args.batch}, bf16 autocast, channels_last with the Flatten hook; "
          f"{args.rounds} alternating rounds of {args.steps} steps per variant\n")
    steps = {name: training_step(options, x, y) for name, options in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with contextlib.ExitStack() as hooks:
        for model, step in steps.values():
            hooks.enter_context(flatten_gradient_hooks(model))
            for _ in range(20):  # warm-up
                step()
        names = list(steps)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[name][1]()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    baseline = times[names[0]]
    print("| optimiser | median ms / step | min ms / step | median ratio to per-tensor SGD |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        ratio = statistics.median(a / b for a, b in zip(values, baseline))
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
