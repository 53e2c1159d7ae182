"""Models: a registry of classifiers that take inputs in the box and return logits."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fortify.models import resnet as _resnet  # noqa: F401  (registers preact-resnet18)
from fortify.models import small as _small  # noqa: F401  (registers small-cnn, mlp, linear)
from fortify.models import wideresnet as _wideresnet  # noqa: F401  (registers wrn-28-10, wrn-34-10)
from fortify.models.normalize import Normalize
from fortify.models.registry import MODELS, ModelSpec

__all__ = ["MODELS", "ModelSpec", "Normalize", "build_model"]


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                ) -> nn.Module:
    """Build a registered model, wrapped in ``Normalize`` when mean/std are given."""
    model = MODELS.get(name)(ModelSpec(tuple(input_shape), int(num_classes)))
    if mean is not None and std is not None:
        model = Normalize(model, mean, std)
    return model
