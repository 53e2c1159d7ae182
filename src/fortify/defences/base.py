"""What the input-transform defences share: ``model(transform(x))`` and a seeded source of noise.

Each defence here is an opt-in wrapper that takes inputs in the box and returns the wrapped model's
logits. They are the classic ways of *masking* gradients (Athalye, Carlini & Wagner, ICML 2018): an
attack that follows the gradient is stopped while the model is no more robust. They exist so that
the gradient-masking verdict and the adaptive attacks (EOT, BPDA) can be tested against them, and so
that a user can see why such a defence's robust accuracy must not be trusted.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError, DataError
from fortify.registry import Registry

DEFENCES: Registry[Callable[..., nn.Module]] = Registry("defence")


def _real(value: object) -> float | None:
    """``value`` as a float if it is a finite real number, else None (True and False are flags, not
    numbers: ``quality=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def check_int_in(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``low..high`` (75.0 counts as 75), else a ConfigError naming the range."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number: float | int | None = int(value)  # exactly: a float holds integers only up to 2**53
    else:
        number = _real(value)
        if number is not None and not number.is_integer():
            number = None
    if number is None or not low <= number <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(number)


def check_number_in(name: str, value: object, *, above: float, at_most: float = math.inf) -> float:
    """``value`` as a float in ``(above, at_most]``, else a ConfigError naming the range."""
    number = _real(value)
    if number is None or not above < number <= at_most:
        allowed = f"> {above:g}" if math.isinf(at_most) else f"in ({above:g}, {at_most:g}]"
        raise ConfigError(f"{name} must be a finite number {allowed}, got {value!r}")
    return number


def check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """``bounds`` as two finite floats ``(low, high)`` with ``low < high``, else a ConfigError."""
    pair = tuple(bounds) if isinstance(bounds, (tuple, list)) else ()
    numbers_given = [_real(b) for b in pair]
    if len(pair) != 2 or None in numbers_given or not numbers_given[0] < numbers_given[1]:
        raise ConfigError(f"bounds must be two finite numbers (low, high) with low < high, got {bounds!r}")
    lo, hi = numbers_given
    return lo, hi


class InputTransformDefence(nn.Module, ABC):
    """``model(transform(x))``: a fixed or random input transform in front of a classifier.

    ``differentiable`` says whether the transform has useful gradients; when it does not, BPDA
    (``fortify.attacks.adaptive.BPDA``) replaces it by the identity in the backward pass.
    ``randomized`` says whether two calls on the same input may differ; when they do, EOT averages
    over the randomness. Random transforms draw from a generator of their own, seeded with ``seed``
    (0 unless given), so a run is reproducible while repeated calls still differ, and the caller's
    global random state is never touched. That stream runs on from call to call
    and is not tied to the attacks' seeds: an evaluation resumed from its journal, or sharded over
    processes, starts it afresh, so its later batches see other draws than an uninterrupted run.
    A ``copy.deepcopy`` of a defence that has drawn carries its generator's state, so the copy draws
    what the original draws next; give copies meant to be independent seeds of their own
    (``reseed``).
    """

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, bounds: tuple[float, float] = (0.0, 1.0),
                 seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.bounds = check_bounds(bounds)
        self.seed = check_int_in("seed", seed, 0, 2 ** 63 - 1)
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise DataError(f"{type(self).__name__} takes floating-point inputs in its box "
                            f"{self.bounds}, got {x.dtype}")
        return self.model(self.transform(x))

    @abstractmethod
    def transform(self, x: Tensor) -> Tensor:
        """The input transform, from the box to the wrapped model's input."""

    def reseed(self, seed: int) -> InputTransformDefence:
        """Start this defence's random stream afresh from ``seed``, on every device: what it draws
        next is what a new defence with that seed would draw first. Returns the defence."""
        self.seed = check_int_in("seed", seed, 0, 2 ** 63 - 1)
        self._generators.clear()
        return self

    def generator(self, device: torch.device) -> torch.Generator:
        """This defence's generator on ``device``, seeded with ``seed`` at its first use."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
