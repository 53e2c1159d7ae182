"""ThreatModel: the one place that projects, clips, samples random starts and checks membership.

Every attack moves inside the set ``{x' : ||x' - x||_p <= eps, lo <= x' <= hi}``. Keeping the
geometry here means an attack can never invent its own clipping rule, and evaluation can verify
every returned point against the same definition.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from fortify.errors import ConfigError, DataError

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _number(value: object) -> float | None:
    """``value`` as a float when it is one real number (Python, NumPy or a one-element tensor);
    None for anything else, text and booleans included."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 and not value.dtype.is_complex else None
    elif hasattr(value, "item") and getattr(value, "size", None) == 1:  # a NumPy scalar or 1-array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _pair_of_numbers(value: object) -> tuple[float, float] | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    items = list(value)
    if len(items) != 2:
        return None
    low, high = _number(items[0]), _number(items[1])
    return None if low is None or high is None else (low, high)


def _round_towards(point: Tensor, nearest: Tensor, x: Tensor) -> Tensor:
    """``point`` (float32) in ``x``'s half-precision dtype with each coordinate rounded towards ``x``,
    from ``nearest``, its rounding to nearest.

    Rounding to nearest can move a coordinate away from ``x`` by half a unit in the last place; in
    bfloat16 that is up to 0.4% of the value, enough to leave the ball. Rounded towards ``x``, no
    coordinate of the perturbation grows, so the point stays in the ball (any norm) and in the box.
    """
    wide_x = x.to(point.dtype)
    grew = (nearest.to(point.dtype) - wide_x).abs() > (point - wide_x).abs()
    return torch.where(grew, torch.nextafter(nearest, x), nearest)


def _per_example(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _expand(per_example: Tensor, like: Tensor) -> Tensor:
    return per_example.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """An eps-ball in ``norm`` intersected with the input box ``bounds``."""

    norm: Norm = "linf"
    eps: float = 8 / 255
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; valid norms: {', '.join(NORMS)}")
        lo, hi = checked_bounds(self.bounds)
        object.__setattr__(self, "bounds", (lo, hi))
        eps = _number(self.eps)
        if eps is None or not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.norm == "linf" and eps > hi - lo:
            raise ConfigError(
                f"eps={eps} is beyond the box: an L-inf eps may be at most the box width {hi - lo}"
            )
        object.__setattr__(self, "eps", eps)

    # -- geometry -----------------------------------------------------------------------------

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example distance ``||x_adv - x||`` in this threat model's norm (at least float32)."""
        work = torch.promote_types(x.dtype, torch.float32)
        delta = _per_example(x_adv.to(work) - x.to(work))
        if self.norm == "linf":
            return delta.abs().amax(dim=1)
        return delta.norm(p=2, dim=1)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """``x_adv`` projected onto the ball around ``x``, then clipped into the box.

        The box clip never leaves the ball: ``x`` is in the box, so clipping moves every
        coordinate of ``x_adv - x`` towards zero. For L-inf the result is the nearest point of ball
        and box (both are boxes). For L2 it is a point of both, not always the nearest one: scaling
        onto the sphere first can spend budget on coordinates the clip then cuts (PGD's usual L2
        projection, as in the libraries fortify is compared with).
        """
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        delta = x_adv.to(work) - x.to(work)
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _per_example(delta).norm(p=2, dim=1)
            scale = (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * _expand(scale, delta)
        lo, hi = self.bounds
        projected = (x.to(work) + delta).clamp(lo, hi)
        if x.dtype in LOW_PRECISION:
            return self._cast_inside(projected, x)
        return projected.to(x.dtype)

    def _cast_inside(self, point: Tensor, x: Tensor) -> Tensor:
        """``point`` (float32, inside ball and box) in ``x``'s half-precision dtype, still inside.

        Rounding to nearest can push a coordinate half a unit in the last place outward (0.4% of the
        value in bfloat16), enough to leave the ball or the box. Rows it pushes out are rounded
        towards ``x`` instead: no coordinate of their perturbation grows, so they stay inside; the
        other rows keep the nearest rounding, which on average keeps more of the budget.
        """
        nearest = point.to(x.dtype)
        lo, hi = self.bounds
        flat = _per_example(nearest.to(point.dtype))
        outside = (self.distance(nearest, x) > self.eps) | (flat < lo).any(dim=1) | (flat > hi).any(dim=1)
        # no `if outside.any()`: project runs at every attack step, and a branch would sync with the GPU
        return torch.where(_expand(outside, nearest), _round_towards(point, nearest, x), nearest)

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the ball around ``x`` (then clipped into the box)."""
        if not x.dtype.is_floating_point:
            raise DataError(f"inputs must be floating point, got dtype {x.dtype}")
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=work)
            delta = (2 * noise - 1) * self.eps
        else:
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=work)
            direction = direction / _expand(_per_example(direction).norm(dim=1).clamp_min(1e-12), x)
            dim = direction[0].numel()
            u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=work)
            # u ** (1/d) makes the radius uniform in volume, so the start is uniform in the ball
            delta = direction * _expand(self.eps * u.pow(1.0 / dim), x)
        return self.project(x.to(work) + delta, x)

    @property
    def constrained(self) -> bool:
        """Whether a feature schema constrains the ball (``fortify.tabular.ConstrainedThreatModel``)."""
        return False

    def coordinate_costs(self, x: Tensor) -> Tensor | None:
        """Per coordinate of one example of ``x``, what a unit change spends of eps (0 where the
        coordinate may not move); None when every coordinate spends 1, as in the plain ball. What
        builds its own perturbations sizes them with it: Square's proposals, Free AT's carried
        perturbation."""
        return None

    def ascent_direction(self, grad: Tensor) -> Tensor:
        """The steepest-ascent unit step for this norm: sign for L-inf, normalised for L2.

        A NaN entry says nothing of the direction and counts as 0; where an entry is infinite (the
        input gradient of ``sqrt`` at 0, say) the infinite entries alone set the L2 direction, which
        inf / inf had made NaN, and the NaN point was then recorded as adversarial.
        """
        grad = grad.nan_to_num(nan=0.0, posinf=torch.inf, neginf=-torch.inf)
        if self.norm == "linf":
            return grad.sign()
        # divided in float32 (or wider): 1e-12 is zero in float16, and a zero gradient would give 0/0
        work = grad.to(torch.promote_types(grad.dtype, torch.float32))
        infinite = _per_example(work).isinf().any(dim=1)
        work = torch.where(_expand(infinite, work), work.isinf().to(work.dtype) * work.sign(), work)
        # each example scaled by its largest entry first: the squares of a saturated softmax's
        # gradient (entries near 1e-22) underflow to 0, and the clamped norm then gave a step of
        # length |g| / 1e-12 that did not move at all
        largest = _per_example(work).abs().amax(dim=1)
        work = work / _expand(torch.where(torch.isfinite(largest) & (largest > 0), largest, 1.0), work)
        norms = _per_example(work).norm(p=2, dim=1).clamp_min(1e-12)
        return (work / _expand(norms, work)).to(grad.dtype)

    def tolerance(self, x: Tensor) -> float:
        """Slack for floating-point rounding when checking membership in ``x``'s dtype.

        Half-precision points get float32's slack: ``distance`` measures them in float32, where their
        differences are exact, and ``project`` (which every attack's answer passes through in half
        precision) rounds them into the ball, so only float32's arithmetic is left to forgive.
        """
        lo, hi = self.bounds
        scale = max(abs(lo), abs(hi)) + self.eps
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        ulp = torch.finfo(work).eps if work.is_floating_point else 0.0
        slack = 4 * ulp * scale
        if self.norm == "l2":
            slack *= math.sqrt(max(1, x[0].numel() if x.dim() else 1))
        return slack

    def contains(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example boolean: ``x_adv`` is inside the ball around ``x`` and inside the box."""
        if x_adv.shape != x.shape:
            raise DataError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")
        tol = self.tolerance(x)
        lo, hi = self.bounds
        flat = _per_example(x_adv.to(torch.promote_types(x.dtype, torch.float32)))
        in_box = (flat >= lo - tol).all(dim=1) & (flat <= hi + tol).all(dim=1)
        finite = torch.isfinite(flat).all(dim=1)
        in_ball = self.distance(x_adv, x) <= self.eps + tol
        return in_box & in_ball & finite

    # -- input validation ---------------------------------------------------------------------

    def check_inputs(self, x: Tensor) -> None:
        """Raise DataError unless ``x`` is a finite batch inside the box."""
        check_in_box(x, self.bounds)
        if self.norm == "l2" and x.dim() > 1:
            diameter = (self.bounds[1] - self.bounds[0]) * math.sqrt(x[0].numel())
            if self.eps > diameter:
                raise ConfigError(
                    f"eps={self.eps} is beyond the box: an L2 eps may be at most the box "
                    f"diameter {diameter:.4g} for inputs of {x[0].numel()} features"
                )

    def with_eps(self, eps: float) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=eps, bounds=self.bounds)

    def to_dict(self) -> dict[str, Any]:
        """What results files record of the threat model; two runs compare only when these agree."""
        return {"norm": self.norm, "eps": self.eps, "bounds": list(self.bounds)}

    def describe(self, exact: bool = False) -> str:
        """``linf eps=0.1 box=[0, 1]``; ``exact`` prints every digit (for telling two apart)."""
        if exact:
            return f"{self.norm} eps={self.eps!r} box=[{self.bounds[0]!r}, {self.bounds[1]!r}]"
        return f"{self.norm} eps={self.eps:.4g} box=[{self.bounds[0]:g}, {self.bounds[1]:g}]"

    def describe_against(self, other: ThreatModel) -> tuple[str, str]:
        """Both descriptions, with every digit when the short ones would read the same."""
        exact = self.describe() == other.describe()
        return self.describe(exact), other.describe(exact)


def checked_bounds(value: object) -> tuple[float, float]:
    """``value`` as a box ``(low, high)`` of two finite numbers with low < high, else a ConfigError."""
    bounds = _pair_of_numbers(value)
    if bounds is None or not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])
                              and bounds[0] < bounds[1]):
        raise ConfigError(f"bounds must be two finite numbers with low < high, got {value!r}")
    return bounds


def check_in_box(x: Tensor, bounds: tuple[float, float]) -> None:
    """Raise DataError unless ``x`` is a non-empty finite batch inside ``bounds``."""
    if x.dim() < 2 or x.numel() == 0:
        raise DataError(f"expected a non-empty batch of shape (N, ...), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise DataError(f"inputs must be floating point, got dtype {x.dtype}")
    lo, hi = bounds
    # one pass and one read for data that passes: min and max are NaN if any value is and +-inf if
    # any value is infinite, so finite in-box extremes mean every value is finite and inside
    x_min, x_max = torch.stack(torch.aminmax(x)).tolist()
    if math.isfinite(x_min) and math.isfinite(x_max) and lo <= x_min and x_max <= hi:
        return
    bad = ~torch.isfinite(x)
    if bad.any():
        raise DataError(f"inputs contain {int(bad.sum())} NaN/Inf values")
    if x_min < lo or x_max > hi:
        raise DataError(
            f"inputs range over [{x_min:.4g}, {x_max:.4g}], outside the declared box [{lo:g}, {hi:g}]"
            "; scale the data into the box or declare other bounds"
        )
