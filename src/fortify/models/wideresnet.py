"""WideResNet (Zagoruyko & Komodakis 2016), the variant of Madry et al., TRADES and RobustBench.

A 3x3 stem of 16 channels, three groups of pre-activation basic blocks of widths 16k, 32k, 64k
(strides 1, 2, 2) with n = (depth - 4) / 6 blocks per group, a final BN-ReLU, global average
pooling and a linear head. WRN-28-10 has about 36.5M parameters and WRN-34-10 about 46.2M.
Pooling is adaptive, so inputs other than 32x32 work too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError
from fortify.models.registry import MODELS, ModelSpec

__all__ = ["WideBasicBlock", "WideResNet", "wrn_28_10", "wrn_34_10"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the shape changes, the shortcut is a 1x1 strided conv of the pre-activated input;
    otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; ``depth`` must satisfy ``(depth - 4) % 6 == 0``."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), "
                f"got {depth}")
        if widen_factor < 1:
            raise ConfigError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
        self.depth = depth
        self.widen_factor = widen_factor
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        groups: list[nn.Module] = []
        in_planes = 16
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks: list[nn.Module] = []
            for block in range(n):
                blocks.append(WideBasicBlock(in_planes, width, stride if block == 0 else 1,
                                             dropout))
                in_planes = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.groups(self.conv1(x))
        out = torch.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


def _image_shape(name: str, spec: ModelSpec) -> tuple[int, ...]:
    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"{name} needs image inputs (C, H, W), got input_shape {spec.input_shape}")
    return spec.input_shape


@MODELS.register("wrn-28-10")
def wrn_28_10(spec: ModelSpec) -> nn.Module:
    """WideResNet-28-10 sized for ``spec``: ``input_shape`` must be (C, H, W)."""
    channels = _image_shape("wrn-28-10", spec)[0]
    return WideResNet(28, 10, num_classes=spec.num_classes, in_channels=channels)


@MODELS.register("wrn-34-10")
def wrn_34_10(spec: ModelSpec) -> nn.Module:
    """WideResNet-34-10 sized for ``spec``: ``input_shape`` must be (C, H, W)."""
    channels = _image_shape("wrn-34-10", spec)[0]
    return WideResNet(34, 10, num_classes=spec.num_classes, in_channels=channels)
