"""PreAct ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The CIFAR-10 variant used by Rice et al. 2020 and Wong et al. 2020: a 3x3 stem with no pooling,
four stages of two pre-activation basic blocks (widths 64-128-256-512, strides 1-2-2-2), a final
BN-ReLU, global average pooling and a linear head. About 11.17M parameters for 10 classes.
Pooling is adaptive, so inputs other than 32x32 work too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError
from fortify.models.registry import MODELS, ModelSpec

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut.

    The shortcut is the identity when shape is kept; otherwise a 1x1 strided conv applied to the
    pre-activated input (as in the paper's "full pre-activation" unit).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + residual


class PreActResNet(nn.Module):
    """A pre-activation ResNet of basic blocks; ``blocks`` gives the count per stage."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ConfigError(f"PreActResNet needs one block count per stage width, got "
                              f"blocks={blocks} and widths={widths}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            stride = 1 if index == 0 else 2
            layers: list[nn.Module] = []
            for block in range(count):
                layers.append(PreActBlock(in_planes, width, stride if block == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
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

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = torch.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@MODELS.register("preact-resnet18")
def preact_resnet18(spec: ModelSpec) -> nn.Module:
    """PreAct ResNet-18 sized for ``spec``: ``input_shape`` must be (C, H, W)."""
    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"preact-resnet18 needs image inputs (C, H, W), got input_shape {spec.input_shape}")
    return PreActResNet((2, 2, 2, 2), num_classes=spec.num_classes,
                        in_channels=spec.input_shape[0])
