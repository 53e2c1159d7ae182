"""Input quantisation to ``bits`` bits per value: bit-depth reduction (Xu, Evans & Qi, NDSS 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.defences.base import DEFENCES, InputTransformDefence, check_int_in


class InputQuantization(InputTransformDefence):
    """Rounds every input value to the nearest of ``2**bits`` evenly spaced levels of the box.

    Rounding is flat almost everywhere, so the input gradient is exactly zero: PGD cannot move and
    reports robustness that BPDA with the identity approximation takes away (Athalye et al. 2018).
    """

    differentiable = False

    def __init__(self, model: nn.Module, *, bits: int = 3, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(model, bounds=bounds)
        self.bits = check_int_in("bits", bits, 1, 16)

    def transform(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds
        levels = 2**self.bits - 1
        # at least float32: float16 overflows past 65504 (x * 65535 at 16 bits) and bfloat16 holds
        # no more than 256 levels, so the levels would not be the ones the bits promise
        wide = x if x.dtype == torch.float64 else x.float()
        quantised = torch.round((wide - lo) / (hi - lo) * levels) / levels * (hi - lo) + lo
        # the top level, (hi - lo) + lo, can round past a face (0.9000000000000001 in a 0.3..0.9
        # box): clamp in x's dtype
        return quantised.to(x.dtype).clamp(lo, hi)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bounds={self.bounds}"


DEFENCES.add("quantize", InputQuantization)
