"""Small networks: a CNN for 8x8 and 28x28 images and an MLP for tabular data."""

from __future__ import annotations

import math

from torch import nn

from fortify.errors import ConfigError
from fortify.models.registry import MODELS, ModelSpec


@MODELS.register("small-cnn")
def small_cnn(spec: ModelSpec) -> nn.Module:
    """Two conv blocks and a two-layer head; sized for 8x8 (digits) up to 28x28 (MNIST)."""
    if len(spec.input_shape) != 3:
        raise ConfigError(f"small-cnn needs image inputs (C, H, W), got {spec.input_shape}")
    channels, height, width = spec.input_shape
    # 8x8 inputs keep their resolution through the first block; larger ones are pooled twice. A block
    # pools before its ReLU: the same values and gradients to the last bit as ReLU then pooling (both
    # are exact and monotone), with the ReLU and its backward pass on a quarter of the elements
    pool_first = height >= 16
    layers: list[nn.Module] = [nn.Conv2d(channels, 32, 3, padding=1)]
    layers += [nn.MaxPool2d(2), nn.ReLU()] if pool_first else [nn.ReLU()]
    layers += [nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
    scale = 4 if pool_first else 2
    if height < scale or width < scale:  # the pooling would leave no feature for the head to read
        raise ConfigError(f"small-cnn pools its input by {scale}: inputs of {height}x{width} are too small; "
                          "choose another model (mlp takes any shape)")
    features = 64 * (height // scale) * (width // scale)
    layers += [nn.Flatten(), nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, spec.num_classes)]
    return nn.Sequential(*layers)


@MODELS.register("mlp")
def mlp(spec: ModelSpec) -> nn.Module:
    """Two hidden layers of 128 units over the flattened input."""
    features = math.prod(spec.input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, spec.num_classes))


@MODELS.register("linear")
def linear(spec: ModelSpec) -> nn.Module:
    """Softmax regression: the model whose worst case PGD can be checked in closed form."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(spec.input_shape), spec.num_classes))
