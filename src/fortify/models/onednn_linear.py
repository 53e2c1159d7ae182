"""``nn.Linear`` on CPU through oneDNN's float32 matrix product, on CPUs where that is the faster one.

PyTorch runs a float32 linear layer on CPU through MKL, which picks its kernels by the CPU's vendor:
on AMD CPUs it takes its AVX2 path even where the CPU has AVX-512. oneDNN, which already runs the
convolutions, uses AVX-512 there. On an AMD EPYC with AVX-512, one thread, a 64x1024 by 1024x128
product took 101 us through oneDNN against 172 us through MKL, a 512x512 by 512x512 one 0.46 of
MKL's time. Where linear layers are a small part of the work the gain is small: a PGD-10 training
epoch of small-cnn took 0.96-0.99 of its time on digits, 0.95 on 28x28 inputs (docs/PERFORMANCE.md,
change log).

``onednn_linear(model)`` makes each ``nn.Linear`` of ``model`` a ``OneDNNLinear`` for the duration:
the class is swapped on the instance, so parameters, hooks, the optimiser's hold on them and the
``state_dict`` stay as they are. The Trainer and the evaluation do this on CPU where
``onednn_linear_pays`` says so. Results differ from MKL's by float rounding only.

The gradient goes over two autograd nodes, one toward the input and one toward the weight and
bias, so that an attack's gradient with respect to the input alone (``autograd.grad(loss, x)``)
skips the weight's product, as torch's own linear layer does. Their backward passes are not
differentiable: a second-order gradient through them (``create_graph=True``) is an error that says
how to switch them off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError

SETTING_VARIABLE = "FORTIFY_ONEDNN_LINEAR"  # unset: where it pays; 1: wherever it can run; 0: never
# Below this many multiply-adds per call the two autograd nodes' Python overhead (tens of us per
# forward and backward) costs more than the faster product saves (bench/linear_kernels.py): with
# every gradient, a 64x128 by 128x10 product took 2.9 times torch's time, 256x64 by 64x128 (2.1
# million) 1.15 times, 256x128 by 128x128 (4.2 million) 0.86 of it.
MIN_MULTIPLY_ADDS = 2**22


def onednn_linear_pays(device: torch.device) -> bool:
    """Whether fortify runs float32 linear layers on ``device`` through oneDNN: as
    ``FORTIFY_ONEDNN_LINEAR`` says (1 or 0); unset, on CPUs with AVX-512 whose vendor is not Intel,
    where MKL's float32 product takes its AVX2 path. A value other than 0 or 1 is a ConfigError."""
    value = read_setting()
    if value == "0" or device.type != "cpu" or not _kernel_available():
        return False
    return value == "1" or (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                            and _cpu_vendor() not in ("GenuineIntel", None))


def read_setting() -> str:
    """``FORTIFY_ONEDNN_LINEAR`` as given ("", "0" or "1"); any other value is a ConfigError (the CLI
    reads it at start, so that a typo such as ``off`` stops a run before it writes anything)."""
    value = os.environ.get(SETTING_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"{SETTING_VARIABLE} must be 1 (oneDNN's float32 product for CPU linear layers), "
                          f"0 (torch's own) or unset (oneDNN where MKL takes its AVX2 path), got {value!r}")
    return value


def _kernel_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _cpu_vendor() -> str | None:
    """The CPU's vendor string (``AuthenticAMD``, ``GenuineIntel``) on Linux; None elsewhere."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@contextlib.contextmanager
def onednn_linear(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each ``nn.Linear`` (the class itself, not subclasses, whose ``forward`` may
    differ) running as a ``OneDNNLinear`` for the duration; their class comes back afterwards."""
    swapped = [module for module in model.modules() if type(module) is nn.Linear]
    for module in swapped:
        module.__class__ = OneDNNLinear
    try:
        yield model
    finally:
        for module in swapped:
            module.__class__ = nn.Linear


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU calls of at least MIN_MULTIPLY_ADDS go through oneDNN;
    other calls (another dtype or device, autocast, ``torch.compile``, small products) are
    ``nn.Linear``'s own."""

    mode_independent = True  # its forward never reads self.training (fortify.models.modes)

    def forward(self, x: Tensor) -> Tensor:
        if not _takes_onednn(x, self.weight):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        if not torch.is_grad_enabled():
            out = _product(rows, self.weight, self.bias)
        else:
            out = _OutputAndInputGradient.apply(rows, self.weight, self.bias)
            if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
                out = out + _ParameterGradients.apply(rows.detach(), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _takes_onednn(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False  # autocast's bf16 product is oneDNN's already; the compiler brings its own
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * weight.shape[0] * weight.shape[1] >= MIN_MULTIPLY_ADDS


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN; ``weight`` may be a transposed view (oneDNN reads
    strides, which was faster than copying it contiguous)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _refuse_second_order() -> None:
    if torch.is_grad_enabled():  # the engine turns grad mode on in backward for create_graph=True
        raise RuntimeError(f"a second-order gradient through a linear layer running on oneDNN "
                           f"(fortify.models.onednn_linear) is not supported; set {SETTING_VARIABLE}=0")


class _OutputAndInputGradient(torch.autograd.Function):
    """The layer's output; its backward hands the gradient to the input only (the weight and bias
    get theirs from ``_ParameterGradients``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        _refuse_second_order()
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return _product(grad, weight.t(), None), None, None


class _ParameterGradients(torch.autograd.Function):
    """Zeros to add to the output (a broadcast view, nothing is filled); its backward hands the
    gradient to the weight and bias. Its input is detached, so that the engine runs this node only
    when a parameter's gradient is asked for."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        return x.new_zeros(()).expand(x.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:  # type: ignore[override]
        _refuse_second_order()
        (x,) = ctx.saved_tensors
        weight_grad = _product(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None
        bias_grad = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None, weight_grad, bias_grad
