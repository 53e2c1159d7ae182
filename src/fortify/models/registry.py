"""The model registry: a name maps to ``factory(spec) -> nn.Module`` returning logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fortify.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """What a factory needs to size a network for a dataset."""

    input_shape: tuple[int, ...]
    num_classes: int


MODELS: Registry[Callable[[ModelSpec], nn.Module]] = Registry("model")
