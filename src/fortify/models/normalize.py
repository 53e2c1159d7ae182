"""Normalisation as a layer: the model takes inputs in the box, attacks never see mean/std."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dimension 1), then the wrapped model."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        if (len(mean) != len(std) or not all(math.isfinite(m) for m in mean)
                or not all(math.isfinite(s) and s > 0 for s in std)):
            raise ConfigError(f"mean and std need equal lengths, finite values and std > 0, "
                              f"got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        # (C,) statistics line up with dimension 1 for images (N, C, H, W) and tables (N, F) alike
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(x.dtype).reshape(shape)
        std = self.std.to(x.dtype).reshape(shape)
        return self.model((x - mean) / std)
