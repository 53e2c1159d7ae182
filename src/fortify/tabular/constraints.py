"""ConstrainedThreatModel: a ThreatModel over a feature schema.

The attacker may move the point ``x`` (model space: every feature scaled into [0, 1], categories
one-hot) to any ``x'`` that

1. changes only mutable features, each only in its allowed direction;
2. keeps every feature in its bounds, integers and binaries whole, categories one-hot;
3. stays within the budget: ``||c||_p <= eps`` where ``c_f`` is feature ``f``'s cost times its change
   (``cost_f * |x'_f - x_f|`` for a numeric feature in scaled units, ``cost_f`` for a category switch),
   and ``p`` is ``linf`` or ``l2``.

The class keeps ThreatModel's interface (``project``, ``random_start``, ``contains``, ``distance``,
``ascent_direction``, ``tolerance``, ``check_inputs``, ``with_eps``, ``describe``), so PGD, APGD, FGSM and
the training objectives run on it unchanged, and evaluation checks their points against it.

What ``project`` guarantees. Whole numbers and one-hot groups make the feasible set non-convex, so
"the nearest point" needs care:

- **linf**: the budget splits into one interval per feature (``|x'_f - x_f| <= eps / cost_f``), so
  the set is a product of per-feature sets, and ``project`` returns the exact Euclidean-nearest
  feasible point: each continuous coordinate clipped to its interval, each integer rounded to the
  nearest allowed whole number, each category group set to the allowed category with the largest
  entry (``argmin_k ||v - e_k||`` is ``argmax_k v_k``). Ties go to the clean point's category.
- **l2**: the budget couples the features. ``project`` returns a feasible point, not always the
  nearest: it projects each feature alone (as for linf with per-feature caps ``eps / cost_f``), keeps
  the cheapest discrete changes that fit the budget (reverting the rest to ``x``), and scales the
  continuous change towards ``x`` to spend what is left.

Every returned point is feasible by construction; ``contains`` re-checks all three conditions on
the actual float values, so a rounding slip cannot pass unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fortify.errors import ConfigError, DataError
from fortify.tabular.schema import Schema, whole_tolerance
from fortify.threat import NORMS, ThreatModel, check_in_box

# Kinds of model column
CONTINUOUS, WHOLE, CATEGORY = 0, 1, 2
# A grid bound like eps / cost * steps = 2.9999999999 must still allow 3 steps
_GRID_SLACK = 1e-9
# contains() rounds one-hot entries to this share of 1 (whole numbers: schema.whole_tolerance)
_DISCRETE_TOLERANCE = 1e-4
# relative slack of the budget for the float64 arithmetic of the norm; the rounding of the stored
# values is forgiven feature by feature (``within_budget``)
_BUDGET_RELATIVE_SLACK = 1e-9


@dataclass(frozen=True)
class _Layout:
    """Per-column tensors of a schema, on one device (cached per device by the threat model)."""

    kind: Tensor  # (d,) CONTINUOUS / WHOLE / CATEGORY
    cost: Tensor  # (d,) the feature's cost on each of its columns
    mutable: Tensor  # (d,) bool
    direction: Tensor  # (d,) -1 decrease only, 0 any, +1 increase only
    steps: Tensor  # (d,) whole numbers in the range (high - low) for WHOLE columns, else 1
    off_grid_slack: Tensor  # (d,) how far, in grid steps, a WHOLE column may be off its grid
    feature_of: Tensor  # (d,) feature index of each column
    feature_discrete: Tensor  # (F,) bool
    feature_mutable: Tensor  # (F,) bool
    groups: tuple[tuple[int, int, bool], ...]  # (start, stop, mutable) of each categorical feature

    @classmethod
    def build(cls, schema: Schema, device: torch.device) -> _Layout:
        kind, cost, mutable, direction, steps, feature_of, groups = [], [], [], [], [], [], []
        for index, f in enumerate(schema.features):
            sign = {"any": 0, "increase": 1, "decrease": -1}[f.direction]
            code = CATEGORY if f.type == "categorical" else WHOLE if f.discrete else CONTINUOUS
            for _ in range(f.width):
                kind.append(code)
                cost.append(f.cost)
                mutable.append(f.mutable)
                direction.append(sign)
                steps.append(f.span if code == WHOLE else 1.0)
                feature_of.append(index)
            if code == CATEGORY:
                cols = schema.columns(index)
                groups.append((cols.start, cols.stop, f.mutable))

        def t(values: list[Any], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(kind=t(kind, torch.long), cost=t(cost, torch.float64), mutable=t(mutable, torch.bool),
                   direction=t(direction, torch.long), steps=t(steps, torch.float64),
                   off_grid_slack=t([whole_tolerance(s) for s in steps], torch.float64),
                   feature_of=t(feature_of, torch.long),
                   feature_discrete=t([f.discrete for f in schema.features], torch.bool),
                   feature_mutable=t([f.mutable for f in schema.features], torch.bool),
                   groups=tuple(groups))


@dataclass(frozen=True, kw_only=True)
class ConstrainedThreatModel(ThreatModel):
    """A weighted ``norm`` budget ``eps`` over the mutable features of ``schema`` (model space [0, 1])."""

    schema: Schema
    _layouts: dict[str, _Layout] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; valid norms: {', '.join(NORMS)}")
        if tuple(float(b) for b in self.bounds) != (0.0, 1.0):
            raise ConfigError(f"a constrained threat model works on the schema's [0, 1] encoding; "
                              f"bounds must be (0, 1), got {self.bounds!r}")
        object.__setattr__(self, "bounds", (0.0, 1.0))
        eps = float(self.eps)
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"eps must be a finite number > 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        if not isinstance(self.schema, Schema):
            raise ConfigError(f"schema must be a fortify.tabular.Schema, got {type(self.schema).__name__}")
        if not any(f.mutable for f in self.schema.features):
            raise ConfigError("the schema marks every feature immutable: the attacker can change nothing")

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as one row of model columns per example (attacks written for images, such as Square,
        view a table as (N, 1, 1, D)); rows of another width than the schema's are refused."""
        rows = x.reshape(x.shape[0], -1)
        if rows.shape[1] != self.schema.n_columns:
            raise DataError(f"the schema has {self.schema.n_columns} model columns "
                            f"({len(self.schema.features)} features) but the inputs have shape "
                            f"{tuple(x.shape)}")
        return rows

    def layout(self, device: torch.device) -> _Layout:
        key = str(device)
        if key not in self._layouts:
            self._layouts[key] = _Layout.build(self.schema, device)
        return self._layouts[key]

    # -- costs -------------------------------------------------------------------------------

    def feature_costs(self, x_adv: Tensor, x: Tensor, *, forgive: float = 0.0) -> Tensor:
        """Per example and feature, cost times change (N, F); inf where an immutable feature moved.

        ``forgive`` is taken off each feature's change first (not below 0): the rounding of the
        stored values, which then costs nothing, however dear the feature."""
        x_adv, x = self._rows(x_adv), self._rows(x)
        lay = self.layout(x.device)
        change = (x_adv.double() - x.double()).abs()
        per_feature = _feature_max(change, lay.feature_of, len(self.schema.features))
        charged = (per_feature - forgive).clamp_min(0.0)
        cost = charged * torch.tensor([f.cost for f in self.schema.features], dtype=torch.float64,
                                      device=x.device)
        moved_immutable = ~lay.feature_mutable & (per_feature > self._value_tolerance(x))
        return torch.where(moved_immutable, torch.inf, cost)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example weighted norm of the change, over features (inf if an immutable one moved)."""
        costs = self.feature_costs(x_adv, x)
        if self.norm == "linf":
            return costs.amax(dim=1).float()
        return costs.pow(2).sum(dim=1).sqrt().float()

    # -- projection ----------------------------------------------------------------------------

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """A feasible point near ``x_adv``: the nearest one for linf, see the module notes for l2."""
        lay = self.layout(x.device)
        x64, v = self._rows(x).double(), self._rows(x_adv).double()
        out = self._project_each_feature(v, x64, lay)
        if self.norm == "l2":
            out = self._fit_l2_budget(out, x64, lay, forgive=self._value_tolerance(x))
        return out.to(x.dtype).reshape(x.shape)

    def _project_each_feature(self, v: Tensor, x: Tensor, lay: _Layout) -> Tensor:
        cap = torch.where(lay.mutable, self.eps / lay.cost, torch.zeros_like(lay.cost))
        lower = torch.maximum(-x, -cap).masked_fill(lay.direction > 0, 0.0)
        upper = torch.minimum(1 - x, cap.expand_as(x)).masked_fill(lay.direction < 0, 0.0)
        lower, upper = lower.clamp(max=0.0), upper.clamp(min=0.0)  # x itself is always allowed
        out = x + torch.minimum(torch.maximum(v - x, lower), upper)
        out = torch.where(lay.kind == WHOLE, self._round_whole(v, x, lay, cap), out)
        for start, stop, mutable in lay.groups:
            may_switch = mutable and float(lay.cost[start]) <= self.eps
            out[:, start:stop] = self._nearest_category(v[:, start:stop], x[:, start:stop], may_switch)
        return out

    @staticmethod
    def _round_whole(v: Tensor, x: Tensor, lay: _Layout, cap: Tensor) -> Tensor:
        """Nearest allowed whole number, counted in grid steps from x (exact: a 1-D integer range)."""
        k0 = (x * lay.steps).round()
        reach = (cap * lay.steps + _GRID_SLACK).floor()
        low_k = torch.maximum(-k0, -reach).masked_fill(lay.direction > 0, 0.0)
        high_k = torch.minimum(lay.steps - k0, reach.expand_as(x)).masked_fill(lay.direction < 0, 0.0)
        move = ((v - x) * lay.steps).round()
        move = torch.minimum(torch.maximum(move, low_k.clamp(max=0.0)), high_k.clamp(min=0.0))
        # an unmoved value keeps x's exact bits (a float32 k / n is not the float64 one)
        return torch.where(move == 0, x, (k0 + move) / lay.steps)

    @staticmethod
    def _nearest_category(v: Tensor, x: Tensor, may_switch: bool) -> Tensor:
        """The allowed category nearest ``v``; the clean block itself, bit for bit, when that is the
        clean category (inputs may be one-hot only to within the schema's tolerance, and an
        immutable group that moved by that much would cost inf)."""
        if not may_switch:
            return x
        # a tiny bonus sends ties to the clean category, so a point on the boundary stays put
        chosen = (v + 1e-9 * x).argmax(dim=1)
        switched = torch.nn.functional.one_hot(chosen, v.shape[1]).to(v.dtype)
        return torch.where((chosen == x.argmax(dim=1))[:, None], x, switched)

    def _fit_l2_budget(self, p: Tensor, x: Tensor, lay: _Layout, forgive: float) -> Tensor:
        """Keep the cheapest discrete changes that fit eps^2, then shrink the continuous change.

        The fit is judged as ``within_budget`` judges it, each change less ``forgive`` (the
        rounding of a stored value): a whole step that costs exactly eps measures eps plus or minus
        a unit in the last place, depending on how the clean value rounded to float32, and must be
        kept either way."""
        squared = self.feature_costs(p, x).pow(2)
        discrete = torch.where(lay.feature_discrete, squared, torch.zeros_like(squared))
        judged = torch.where(lay.feature_discrete, self.feature_costs(p, x, forgive=forgive).pow(2),
                             torch.zeros_like(squared))
        ordered, order = judged.sort(dim=1)
        fits = ordered.cumsum(dim=1) <= (self.eps * (1 + _BUDGET_RELATIVE_SLACK)) ** 2
        keep = torch.zeros_like(fits).scatter(1, order, fits) | ~lay.feature_discrete
        keep_column = keep[:, lay.feature_of]
        p = torch.where(keep_column, p, x)
        spent = (discrete * keep).sum(dim=1)
        continuous = torch.where(lay.feature_discrete, torch.zeros_like(squared), squared).sum(dim=1)
        left = (self.eps ** 2 - spent).clamp_min(0.0)
        scale = (left.sqrt() / continuous.sqrt().clamp_min(1e-300)).clamp(max=1.0)
        # shrinking towards x keeps bounds and directions: x is feasible and each interval holds it
        shrunk = x + (p - x) * scale[:, None]
        return torch.where(lay.kind == CONTINUOUS, shrunk, p)

    # -- sampling and steps --------------------------------------------------------------------

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random feasible point: uniform noise within each feature's cap, a random allowed category."""
        lay = self.layout(x.device)
        shape, x = x.shape, self._rows(x)
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        cap = self.eps / lay.cost
        if self.norm == "l2":
            # an l2 budget shared by F features gives each about eps / sqrt(F)
            cap = cap / math.sqrt(len(self.schema.features))
        v = x.double() + (2 * noise - 1) * cap
        # category columns get pure noise: the projection's argmax then picks a uniform allowed category
        v = torch.where(lay.kind == CATEGORY, noise, v)
        return self.project(v.to(x.dtype), x).reshape(shape)

    @property
    def constrained(self) -> bool:
        return True

    def coordinate_costs(self, x: Tensor) -> Tensor:
        """Each column's cost (a numeric feature's change in scaled units spends cost times it), 0 on
        immutable columns; in the shape of one example of ``x``."""
        lay = self.layout(x.device)
        costs = torch.where(lay.mutable, lay.cost, torch.zeros_like(lay.cost))
        return costs.to(x.dtype).reshape(x.shape[1:])

    def ascent_direction(self, grad: Tensor) -> Tensor:
        """Steepest ascent for the weighted norm, zero on immutable columns and forbidden directions.

        linf: ``sign(g) / cost`` (a step of eta moves each feature eta / cost); l2: ``g / cost^2``
        scaled to unit weighted norm.
        """
        lay = self.layout(grad.device)
        g = self._rows(grad).double()
        allowed = lay.mutable & ~((lay.direction > 0) & (g < 0)) & ~((lay.direction < 0) & (g > 0))
        g = torch.where(allowed, g, torch.zeros_like(g))
        if self.norm == "linf":
            return (g.sign() / lay.cost).to(grad.dtype).reshape(grad.shape)
        step = g / lay.cost.pow(2)
        # scaled by its largest entry first, as ThreatModel.ascent_direction: a gradient below the
        # norm's clamp (a saturated softmax) gave a step too short to move
        largest = step.abs().amax(dim=1, keepdim=True)
        step = step / torch.where(torch.isfinite(largest) & (largest > 0), largest, 1.0)
        norms = (step * lay.cost).norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (step / norms).to(grad.dtype).reshape(grad.shape)

    # -- membership ----------------------------------------------------------------------------

    def within_budget(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per example: the weighted norm of the change is at most eps, up to float rounding.

        Each feature's change is forgiven the rounding of a stored value (``_value_tolerance``)
        before its cost weighs it, so the slack stays that of one value per feature: a slack on
        the whole norm would grow with the dearest feature's cost and let every cheap feature
        move that much further."""
        costs = self.feature_costs(x_adv, x, forgive=self._value_tolerance(x))
        norm = costs.amax(dim=1) if self.norm == "linf" else costs.pow(2).sum(dim=1).sqrt()
        return norm <= self.eps * (1 + _BUDGET_RELATIVE_SLACK)

    def _value_tolerance(self, x: Tensor) -> float:
        """Slack on a single scaled value (bounds, 'unchanged'): float32 rounding at least, since
        float32 points are compared in float64 inside ``project``."""
        ulp = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 0.0
        return 8 * max(ulp, torch.finfo(torch.float32).eps)

    def contains(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per example: every constraint holds (bounds, types, mutability, directions, budget)."""
        if x_adv.shape != x.shape:
            raise DataError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")
        lay = self.layout(x.device)
        tol = self._value_tolerance(x)
        a, x64 = self._rows(x_adv).double(), self._rows(x).double()
        ok = torch.isfinite(a).all(dim=1)
        ok &= ((a >= -tol) & (a <= 1 + tol)).all(dim=1)
        delta = a - x64
        wrong_way = ((lay.direction > 0) & (delta < -tol)) | ((lay.direction < 0) & (delta > tol))
        ok &= ~wrong_way.any(dim=1)
        ok &= self._discrete_ok(a, lay)
        ok &= self.within_budget(x_adv, x)
        return ok

    @staticmethod
    def _discrete_ok(a: Tensor, lay: _Layout) -> Tensor:
        grid = a * lay.steps
        off_grid = (lay.kind == WHOLE) & ((grid - grid.round()).abs() > lay.off_grid_slack)
        ok = ~off_grid.any(dim=1)
        for start, stop, _ in lay.groups:
            block = a[:, start:stop]
            zero_or_one = ((block.abs() <= _DISCRETE_TOLERANCE)
                           | ((block - 1).abs() <= _DISCRETE_TOLERANCE)).all(dim=1)
            ok &= zero_or_one & ((block.sum(dim=1) - 1).abs() <= _DISCRETE_TOLERANCE)
        return ok

    # -- validation and variants -----------------------------------------------------------------

    def check_inputs(self, x: Tensor) -> None:
        """Raise DataError unless ``x`` is a finite batch of valid encodings of the schema."""
        check_in_box(x, self.bounds)
        self.schema.check_encoded(x)

    def with_eps(self, eps: float) -> ConstrainedThreatModel:
        return replace(self, eps=eps, _layouts={})

    def to_dict(self) -> dict[str, Any]:
        """The box threat model's record plus the constraints: which features move, how, at what cost
        (the schema). A run under other constraints measured another threat model."""
        return {**super().to_dict(), "constraints": {"description": self.describe(),
                                                     "schema": self.schema.to_dict()}}

    def describe(self) -> str:
        mutable = sum(f.mutable for f in self.schema.features)
        return (f"constrained {self.norm} eps={self.eps:.4g} over {mutable} mutable of "
                f"{len(self.schema.features)} features")


def _feature_max(values: Tensor, feature_of: Tensor, n_features: int) -> Tensor:
    """Per example and feature, the largest value over the feature's columns (N, F)."""
    out = torch.zeros(values.shape[0], n_features, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(1, feature_of.expand_as(values), values, reduce="amax", include_self=True)
