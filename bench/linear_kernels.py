"""Linear layers on CPU: torch's own (MKL's float32 product) against fortify's OneDNNLinear.

For each product shape (rows x in -> out), the median time of: the forward pass alone (no grad),
a forward and backward with every gradient (a training step's), and a forward and backward with the
input's gradient alone (an attack step's, the weights still trainable). Both layers hold the same
weights and see the same inputs; the two run interleaved in blocks, and the median of the blocks is
printed with the ratio torch / oneDNN. OneDNNLinear is forced on for its calls (``_takes_onednn``
says when fortify uses it): the smallest shapes show why there is a threshold.

    taskset -c 1 .venv/bin/python bench/linear_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from _common import add_allocator_option, apply_process_options, print_provenance
from fortify.models import onednn_linear as kernels

SHAPES = ((64, 128, 10), (256, 64, 128), (256, 128, 128), (64, 1024, 128), (64, 3136, 128),
          (512, 512, 512), (8, 1024, 128))


def timed(step: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def workloads(layer: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    grad = torch.randn(x.shape[0], layer.out_features)
    x_grad = x.detach().requires_grad_()

    def forward() -> object:
        with torch.no_grad():
            return layer(x)
    def train() -> object:
        return torch.autograd.grad(layer(x_grad), [x_grad, *layer.parameters()], grad)
    return {"forward": forward, "train (all gradients)": train,
            "attack (input gradient)": lambda: torch.autograd.grad(layer(x_grad), x_grad, grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.05, help="about this long per block and contender")
    add_allocator_option(parser)
    args = parser.parse_args()
    apply_process_options(args)
    if not kernels._kernel_available():
        raise SystemExit("this torch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")
    print_provenance([])
    print(f"fortify uses oneDNN here by default: {kernels.onednn_linear_pays(torch.device('cpu'))} "
          f"(CPU capability {torch.backends.cpu.get_cpu_capability()}, vendor {kernels._cpu_vendor()}); "
          f"threshold {kernels.MIN_MULTIPLY_ADDS:,} multiply-adds per call")
    print("| rows x in -> out | workload | torch us | oneDNN us | torch / oneDNN | torch GFLOP/s "
          "| oneDNN GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    real_threshold = kernels.MIN_MULTIPLY_ADDS
    kernels.MIN_MULTIPLY_ADDS = 0  # every call on oneDNN, the small ones included
    try:
        for rows, inputs, outputs in SHAPES:
            torch.manual_seed(0)
            theirs = nn.Linear(inputs, outputs)
            ours = copy.deepcopy(theirs)
            ours.__class__ = kernels.OneDNNLinear
            x = torch.randn(rows, inputs)
            torch_steps, onednn_steps = workloads(theirs, x), workloads(ours, x)
            for name, torch_step in torch_steps.items():
                onednn_step = onednn_steps[name]
                for step in (torch_step, onednn_step):
                    step()  # warm-up: oneDNN builds its primitive on the first call
                calls = max(1, int(args.seconds / timed(torch_step, 3)))
                times: dict[int, list[float]] = {0: [], 1: []}
                for block in range(args.blocks):
                    order = (0, 1) if block % 2 == 0 else (1, 0)
                    for index in order:
                        times[index].append(timed((torch_step, onednn_step)[index], calls))
                torch_s, onednn_s = statistics.median(times[0]), statistics.median(times[1])
                products = {"forward": 1, "train (all gradients)": 3, "attack (input gradient)": 2}[name]
                flops = 2 * rows * inputs * outputs * products
                print(f"| {rows}x{inputs} -> {outputs} | {name} | {torch_s * 1e6:.1f} | "
                      f"{onednn_s * 1e6:.1f} | {torch_s / onednn_s:.2f} | {flops / torch_s / 1e9:.1f} | "
                      f"{flops / onednn_s / 1e9:.1f} |")
    finally:
        kernels.MIN_MULTIPLY_ADDS = real_threshold


if __name__ == "__main__":
    main()
