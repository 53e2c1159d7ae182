"""A model wrapper for tests that count how many forward passes an attack or evaluation spends."""

from __future__ import annotations

from torch import Tensor, nn


class PassCounter(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = 0

    def forward(self, x: Tensor) -> Tensor:
        self.passes += 1
        return self.model(x)
