"""small-cnn with each block pooling before its ReLU (fortify's order) against ReLU then pooling.

Both orders compute the same values and gradients to the last bit (the script checks it); pooling
first runs the ReLU and its backward pass on a quarter of the elements. For each input shape and
batch, the median time of an attack step (forward and input gradient) and of a training step
(forward, backward with every gradient) on CPU, with the weights channels_last and the linear layers
as fortify's evaluation runs them (``fortify.pipeline.eval_layout``); the two orders alternate in
blocks of steps.

    taskset -c 1 .venv/bin/python bench/pool_relu_order.py --threads 1 --keep-freed-memory
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _common import NUM_CLASSES, add_allocator_option, apply_process_options, load_average, print_provenance
from fortify.models import build_model
from fortify.pipeline import eval_layout


def relu_then_pool(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model``'s layer list with each pooling and the ReLU after it swapped back."""
    layers = list(model)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers)  # the same layer objects: the same weights


def steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], object]]:
    def attack() -> torch.Tensor:
        point = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(point), y, reduction="sum"), point)[0]

    def train() -> list[torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [p.grad for p in model.parameters()]
    return {"attack step": attack, "train step": train}


def median_ms(step: Callable[[], object], calls: int, samples: list[float]) -> None:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    samples.append((time.perf_counter() - start) / calls * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="1x8x8,1x28x28", help="input shapes, comma-separated")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--blocks", type=int, default=9, help="alternating blocks per order")
    parser.add_argument("--calls", type=int, default=30, help="steps per block")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_process_options(args)
    print_provenance([])
    print(f"load:     {load_average()} (1/5/15-minute load average at start)\n")
    print("| input | batch | step | ReLU then pool ms | pool then ReLU ms | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for shape in (tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")):
        torch.manual_seed(0)
        fortify_order = build_model("small-cnn", shape, NUM_CLASSES).eval()
        textbook = relu_then_pool(fortify_order)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, NUM_CLASSES, (batch,))
            with eval_layout(fortify_order, True):
                ours, theirs = steps(fortify_order, x, y), steps(textbook, x, y)
                for name in ours:
                    if not all(torch.equal(a, b) for a, b in zip(_flat(ours[name]()), _flat(theirs[name]()))):
                        raise SystemExit(f"the two orders differ in the {name} on {shape}")
                    times: dict[str, list[float]] = {"textbook": [], "fortify": []}
                    for block in range(args.blocks):
                        order = [("fortify", ours), ("textbook", theirs)][:: 1 if block % 2 else -1]
                        for label, work in order:
                            median_ms(work[name], args.calls, times[label])
                    slow, fast = (statistics.median(times[k]) for k in ("textbook", "fortify"))
                    print(f"| {'x'.join(map(str, shape))} | {batch} | {name} | {slow:.3f} | {fast:.3f} "
                          f"| {fast / slow:.3f} |")
    print(f"\nload at end: {load_average()}")


def _flat(result: object) -> list[torch.Tensor]:
    return list(result) if isinstance(result, list) else [result]  # type: ignore[list-item]


if __name__ == "__main__":
    main()
