"""A module that multiplies its input by a constant: a model moved to another box (x / 255 in front
of a [0, 1] model is the same model on [0, 255] inputs), for tests of box-relative defaults."""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor
