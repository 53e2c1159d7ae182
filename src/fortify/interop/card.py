"""The input card of an external model: the layout, value range and normalisation it was trained on.

fortify's attacks work on the dataset's inputs as they are: channels first, values in the dataset's
box. A model from another framework may expect channels last, pixels in [0, 255] or standardised
inputs. ``InputAdapter`` converts fortify's inputs into the model's convention inside the forward
pass, so the threat model (eps, box) stays in the dataset's units and gradients flow through the
conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError, DataError
from fortify.models.modes import restore_modes, save_modes
from fortify.models.predictions import predicted_class

LAYOUTS = ("nchw", "nhwc")  # channels first (fortify's and torch's), channels last (Keras' default)
LAYOUT_CHOICES = ("auto", *LAYOUTS)


@dataclass(frozen=True)
class InputCard:
    """How the model wants its inputs; the defaults are fortify's own convention."""

    layout: str = "nchw"
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; valid layouts: {', '.join(LAYOUTS)}")
        low, high = (float(v) for v in self.input_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"input range must be two finite numbers low < high, got {self.input_range}")
        object.__setattr__(self, "input_range", (low, high))
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give --mean and --std together (or neither), got "
                              f"mean={self.mean}, std={self.std}")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ConfigError(f"mean and std need one value per channel each, got {len(self.mean)} "
                                  f"means and {len(self.std)} stds")
            if not all(math.isfinite(s) and s > 0 for s in self.std):
                raise ConfigError(f"every std must be a finite number > 0, got {self.std}")
            if not all(math.isfinite(m) for m in self.mean):
                raise ConfigError(f"every mean must be a finite number, got {self.mean}")
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_numbers(text: str | None, flag: str, count: int | None = None) -> tuple[float, ...] | None:
    """``"0,255"`` -> ``(0.0, 255.0)``; None stays None. ``count`` fixes how many are allowed."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers such as 0,255; got {text!r}") from None
    if not values or (count is not None and len(values) != count):
        wanted = f"{count} numbers" if count is not None else "at least one number"
        raise ConfigError(f"{flag} takes {wanted}, got {text!r}")
    return values


def _as_layout(data_shape: Sequence[int], layout: str) -> tuple[int, ...]:
    shape = tuple(data_shape)
    return shape[1:] + shape[:1] if layout == "nhwc" else shape


def _fits(declared: Sequence[int | None], shape: Sequence[int]) -> bool:
    # None marks a dimension the model leaves open
    return len(declared) == len(shape) and all(d is None or d == s for d, s in zip(declared, shape))


def resolve_layout(requested: str, declared: Sequence[int | None] | None,
                   data_shape: Sequence[int]) -> str:
    """The layout under which the dataset's inputs fit the model's declared input shape.

    ``declared`` excludes the batch dimension; None means the model does not say.
    """
    if requested not in LAYOUT_CHOICES:
        raise ConfigError(f"unknown layout {requested!r}; valid layouts: {', '.join(LAYOUT_CHOICES)}")
    if len(data_shape) < 2:  # a feature vector has no channel axis to move
        if requested == "nhwc":
            raise ConfigError(f"--layout nhwc moves the channel axis of images; the dataset's inputs are "
                              f"feature vectors of shape {tuple(data_shape)}")
        if declared is not None and not _fits(declared, data_shape):
            raise DataError(f"the model expects inputs of shape {tuple(declared)} but the dataset's "
                            f"inputs have shape {tuple(data_shape)}")
        return "nchw"
    if requested != "auto":
        if declared is not None and not _fits(declared, _as_layout(data_shape, requested)):
            raise DataError(f"the model expects inputs of shape {tuple(declared)} but the dataset's "
                            f"inputs {tuple(data_shape)} in layout {requested} have shape "
                            f"{_as_layout(data_shape, requested)}")
        return requested
    if declared is None:
        return "nchw"
    fitting = [layout for layout in LAYOUTS if _fits(declared, _as_layout(data_shape, layout))]
    if not fitting:
        raise DataError(f"the model expects inputs of shape {tuple(declared)}, which fits the dataset's "
                        f"inputs {tuple(data_shape)} neither channels first nor channels last")
    if len(fitting) > 1:
        raise ConfigError(f"the model's input shape {tuple(declared)} fits the dataset's inputs both "
                          "channels first and channels last; pass --layout nchw or --layout nhwc")
    return fitting[0]


class InputAdapter(nn.Module):
    """Maps inputs from the dataset's box and layout to the card's convention, then runs the model."""

    def __init__(self, model: nn.Module, card: InputCard, bounds: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.card = card
        low, high = bounds
        target_low, target_high = card.input_range
        self.scale = (target_high - target_low) / (high - low)
        self.shift = target_low - low * self.scale
        device = _device_of(model)
        if card.mean is not None and card.std is not None:
            self.register_buffer("mean", torch.tensor(card.mean, device=device))
            self.register_buffer("std", torch.tensor(card.std, device=device))
        else:
            self.mean = self.std = None
        # evaluation and training find a model's device from its first parameter; a model that
        # runs outside torch (onnxruntime) or keeps its weights as buffers has none
        self.device_anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.scale + self.shift
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.to(x.dtype).reshape(shape)) / self.std.to(x.dtype).reshape(shape)
        if self.card.layout == "nhwc":
            x = x.movedim(1, -1)
        return self.model(x)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def check_channels(card: InputCard, data_shape: Sequence[int]) -> None:
    """mean/std need one value per channel (per feature for tabular data)."""
    if card.mean is None:
        return
    channels = data_shape[0]
    if len(card.mean) not in (1, channels):
        raise ConfigError(f"--mean/--std give {len(card.mean)} values but the inputs have {channels} "
                          f"channel{'s' if channels != 1 else ''} (shape {tuple(data_shape)}); give "
                          + ("1 value" if channels == 1 else f"1 or {channels} values"))


def check_on_sample(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> list[str]:
    """Run the adapted model on a sample batch: raise on a wrong output, warn on chance accuracy."""
    modes = save_modes(model)
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            outputs = model(x.to(device))
    except (RuntimeError, ValueError) as err:
        raise DataError(f"the model fails on a batch of the dataset's inputs {tuple(x.shape)}: {err}; "
                        "check --layout and the dataset") from None
    finally:
        restore_modes(modes)
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
        what = outputs.dtype if isinstance(outputs, Tensor) else type(outputs).__name__
        raise DataError(f"the model returns {what} outputs; fortify needs floating-point logits")
    logits = outputs.cpu()
    if logits.shape != (len(x), num_classes):
        raise DataError(f"the model returns outputs of shape {tuple(logits.shape)} for {len(x)} inputs; "
                        f"expected ({len(x)}, {num_classes}): one logit per class of the dataset")
    if not torch.isfinite(logits).all():
        raise DataError("the model returns NaN or infinite outputs on the dataset's inputs; check "
                        "--input-range and --mean/--std")
    warnings = [_PROBABILITIES] if _look_like_probabilities(logits) else []
    accuracy = float((predicted_class(logits) == y).float().mean())
    chance = 1.0 / num_classes
    if accuracy <= chance + 0.25 * (1 - chance):
        warnings.append(f"clean accuracy on a sample of {len(x)} inputs is {100 * accuracy:.1f}%, close to "
                        f"chance ({100 * chance:.0f}%): the input card (--layout, "
                        "--input-range, --mean/--std) may not match how the model was trained")
    return warnings


_PROBABILITIES = ("the model's outputs lie in [0, 1] and sum to 1, as probabilities do, and fortify found no "
                  "final softmax to bypass: gradient attacks on saturated probabilities understate what "
                  "an attacker with the logits reaches; export the model without its softmax")


def _look_like_probabilities(outputs: Tensor) -> bool:
    rows = outputs.double()
    return bool(rows.min() >= 0 and rows.max() <= 1 and (rows.sum(1) - 1).abs().max() <= 1e-4)
