"""The input gradient of a network's first convolution, which every attack step pays for.

A first convolution has few input channels (1 for digits and MNIST, 3 for CIFAR-10), and oneDNN
computes its gradient with respect to the input far below the machine's peak. This script times
that gradient on CPU, for the first convolutions of the models the other benchmarks use, as the
torch kernel computes it (``aten::convolution_backward`` asked for the input gradient alone) and
three ways of writing the same sum that a forward hook could route the gradient through:

- ``conv_transpose2d``: the transposed convolution with the same weight;
- ``flipped conv2d``: a convolution of the output gradient with the weight's channels swapped and
  its kernel turned by 180 degrees;
- ``matmul + fold``: one matrix product of the output gradient with the flattened weight, then
  ``F.fold`` sums the kernel taps into the pixels they came from.

Each prints its median time, its rate over the convolution's FLOPs, and its largest absolute
difference from the torch kernel's result.

    taskset -c 1 .venv/bin/python bench/conv_input_gradient.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from _common import check_repeats, load_average, print_provenance

# (what it is, batch, input channels, output channels, side): 3x3 convolutions, padding 1, stride 1
FIRST_LAYERS = (
    ("small-cnn on digits", 64, 1, 32, 8),
    ("small-cnn on MNIST", 128, 1, 32, 28),
    ("PreAct ResNet-18 stem, CIFAR-10", 128, 3, 64, 32),
)


def torch_kernel(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, False, False])[0]


def transposed(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return F.conv_transpose2d(grad, weight, padding=1)


def flipped(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(grad, weight.transpose(0, 1).flip(2, 3), padding=1)


def matmul_fold(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    n, c_out, h, w = grad.shape
    taps = grad.permute(0, 2, 3, 1).reshape(-1, c_out) @ weight.reshape(c_out, -1)
    return F.fold(taps.view(n, h * w, -1).transpose(1, 2), (h, w), 3, padding=1)


ROUTES: tuple[tuple[str, Callable[[Tensor, Tensor, Tensor], Tensor]], ...] = (
    ("torch kernel", torch_kernel), ("conv_transpose2d", transposed),
    ("flipped conv2d", flipped), ("matmul + fold", matmul_fold))


def median_ms(run: Callable[[], Tensor], calls: int, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed repeat")
    args = parser.parse_args()
    check_repeats(parser, args)
    torch.set_num_threads(args.threads)
    print_provenance([])
    print()
    print("| first layer | layout | route | median ms | GFLOP/s | max abs difference |")
    print("|---|---|---|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for label, batch, c_in, c_out, side in FIRST_LAYERS:
        flops = 2 * batch * side * side * c_out * c_in * 9
        for layout in (torch.contiguous_format, torch.channels_last):
            # .to, not .contiguous: a tensor with one channel already passes as channels_last in NCHW
            # strides, and mixed strides take oneDNN's slow path; fortify restrides its weights so
            # (fortify.models.layout.to_channels_last)
            x, weight, grad = (torch.randn(shape, generator=generator).to(memory_format=layout)
                               for shape in ((batch, c_in, side, side), (c_out, c_in, 3, 3),
                                             (batch, c_out, side, side)))
            reference = torch_kernel(grad, x, weight)
            name = "channels_last" if layout is torch.channels_last else "NCHW"
            for route_name, route in ROUTES:
                ms = median_ms(lambda: route(grad, x, weight), args.calls, args.repeats)  # noqa: B023
                difference = (route(grad, x, weight) - reference).abs().max().item()
                print(f"| {label} {c_in}->{c_out}, {side}x{side}, batch {batch} | {name} | {route_name} "
                      f"| {ms:.3f} | {flops / ms / 1e6:.1f} | {difference:.1e} |")
    print(f"\nload at end: {load_average()}")


if __name__ == "__main__":
    main()
