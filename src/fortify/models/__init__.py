"""Models: a registry of classifiers that take inputs in the box and return logits."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import nn

from fortify.errors import ConfigError
from fortify.models import resnet as _resnet  # noqa: F401  (registers preact-resnet18)
from fortify.models import small as _small  # noqa: F401  (registers small-cnn, mlp, linear)
from fortify.models import wideresnet as _wideresnet  # noqa: F401  (registers wrn-28-10, wrn-34-10)
from fortify.models.normalize import Normalize
from fortify.models.registry import MODELS, ModelSpec

__all__ = ["MODELS", "ModelSpec", "Normalize", "build_model"]


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                ) -> nn.Module:
    """Build a registered model, wrapped in ``Normalize`` when mean and std are given (one value per
    channel, the first entry of ``input_shape``)."""
    shape = _checked_shape(input_shape)
    if not _is_count(num_classes) or num_classes < 2:
        raise ConfigError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
    if (mean is None) != (std is None):
        raise ConfigError(f"give mean and std together, or neither; got mean={mean}, std={std}")
    model = MODELS.get(name)(ModelSpec(shape, int(num_classes)))
    if mean is not None and std is not None:
        if len(mean) != shape[0]:
            raise ConfigError(f"mean and std need one value per channel: the input {shape} has {shape[0]}, "
                              f"got {len(mean)}")
        model = Normalize(model, mean, std)
    return model


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(_is_count(d) and d >= 1 for d in shape):
        raise ConfigError(f"input_shape must be whole numbers >= 1 (C, H, W or features), "
                          f"got {input_shape!r}")
    return tuple(int(d) for d in shape)
