"""HopSkipJump (Chen, Jordan & Wainwright, IEEE S&P 2020): a decision-based, minimal-perturbation attack.

The attack sees only the predicted label. From an adversarial starting point (uniform noise in the
box, pulled towards ``x`` by a binary search on the blend) it repeats three steps:

1. a binary search along the path to ``x`` to a point just on the adversarial side of the boundary
   (L2: the segment; L-inf: the shrinking box ``x + clip(x_adv - x, -r, r)``);
2. a Monte-Carlo estimate of the boundary normal there, from the labels of ``B_t = B_0 sqrt(t)``
   random points at radius ``delta_t`` (Gaussian directions for L2, uniform for L-inf, each of unit
   L2 norm), with the mean label as baseline;
3. a geometric step-size search: step ``||x_adv - x|| / sqrt(t)`` along the estimate (its sign for
   L-inf), halved until the point is adversarial.

Constants follow the authors' code: ``theta = gamma / d^{3/2}`` (L2) or ``gamma / d^2`` (L-inf) sets
the binary-search precision, and ``delta_t = sqrt(d) * theta * dist_{t-1}`` (L2) or
``d * theta * dist_{t-1}`` (L-inf) (``0.1`` of the box width in the first iteration).

Every example runs the same steps in lockstep but spends its own queries: each model call counts
one query per row, a binary search or step search stops asking for an example whose budget is
spent, and an iteration's sample size shrinks to what the budget leaves. ``last_queries`` holds the
per-example count of the latest call and never exceeds ``max_queries``.

Threat-model contract: ``perturb`` returns the closest adversarial point found when its distance is
at most eps, and the clean ``x`` otherwise. Projecting a farther point onto the ball is not tried:
the projection lies on the search path to ``x``, on the clean side of the boundary the binary
search found, so it would almost never fool the model and would cost a query. An example stops as
soon as it has a point within eps. ``minimal`` runs the search without that stop and returns the
points and their distances (0 for a misclassified input, inf where no adversarial point was
found), which is what label-only membership inference needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, check_label_range, check_positive_int, diagnose_failure
from fortify.errors import ConfigError
from fortify.models.batching import query_batch
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import fooled_beyond_rounding, predicted_class
from fortify.threat import ThreatModel

_INIT_BLEND_TOLERANCE = 1e-3  # precision of the blend factor when pulling the random start to x
_MAX_HALVINGS = 64  # a bisection or step search never needs more halvings than a float has bits
_PROBE_ULPS = 16  # the least a probe moves a coordinate by, in units in the last place
_SAMPLE_ELEMENTS = 1 << 22  # cap on the elements of one block of Monte-Carlo samples (16 MiB float32)


class HopSkipJump(Attack):
    """Untargeted HopSkipJump under an L-inf or L2 threat model, using argmax labels only."""

    name = "hopskipjump"
    keeps_feature_schema = False  # it starts from noise over the whole box and bisects every coordinate

    def __init__(
        self,
        threat: ThreatModel,
        *,
        max_queries: int = 5000,
        max_iter: int = 64,
        init_evals: int = 100,
        max_evals: int = 10_000,
        init_trials: int = 100,
        gamma: float = 1.0,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=False, seed=seed)
        self.max_queries = check_positive_int("max_queries", max_queries)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.init_evals = check_positive_int("init_evals", init_evals)
        self.max_evals = check_positive_int("max_evals", max_evals)
        self.init_trials = check_positive_int("init_trials", init_trials)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and math.isfinite(gamma)
                                           and gamma > 0):
            raise ConfigError(f"gamma must be a finite number > 0, got {gamma!r}")
        self.gamma = float(gamma)
        # the box as a threat model whose ball holds the whole box: its projection is the box clip
        lo, hi = threat.bounds
        self._box = ThreatModel("linf", hi - lo, threat.bounds)
        self.last_queries: Tensor | None = None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.max_queries}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "max_queries": self.max_queries, "max_iter": self.max_iter,
                "init_evals": self.init_evals, "max_evals": self.max_evals, "init_trials": self.init_trials,
                "gamma": self.gamma}

    def with_threat(self, threat: ThreatModel) -> HopSkipJump:
        clone = super().with_threat(threat)
        assert isinstance(clone, HopSkipJump)
        lo, hi = threat.bounds
        clone._box = ThreatModel("linf", hi - lo, threat.bounds)
        return clone

    # -- entry points -------------------------------------------------------------------------

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        best, dist = self._search(model, x, y, generator, good_enough=self.threat.eps)
        inside = (dist <= self.threat.eps).reshape(-1, *([1] * (x.dim() - 1)))
        return self.threat.project(torch.where(inside, best, x), x)

    def minimal(self, model: nn.Module, x: Tensor, y: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Closest adversarial point found per example and its distance, not limited to eps.

        Where nothing was found within the budget the point is ``x`` and the distance ``inf``;
        where ``x`` is already misclassified, ``x`` and 0 (the contract of FMN's, FAB's and C&W's
        ``minimal``). The model's mode is restored; queries land in ``last_queries``.
        """
        self._check_batch(x, y, None)
        with evaluation_mode(model):  # label-only: no gradients, so no attacking() context
            try:
                return self._search(model, x.detach(), y, self.seeded(x, generator), good_enough=0.0)
            except (IndexError, RuntimeError) as err:  # name the caller's mistake, as ``run`` does
                diagnose_failure(model, x, y, err)
                raise

    # -- the search ---------------------------------------------------------------------------

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
                good_enough: float) -> tuple[Tensor, Tensor]:
        """Closest adversarial points and their distances; an example stops at ``good_enough``."""
        oracle = _Oracle(model, y, self.max_queries, self.batch_size or query_batch(x.device))
        self.last_queries = oracle.queries
        with torch.no_grad():
            best = x.clone()
            dist = torch.full((x.shape[0],), torch.inf, device=x.device, dtype=_work_dtype(x))
            dist[oracle.ask_clean(x)] = 0.0
            active = (dist > good_enough).nonzero().squeeze(1)
            found = self._initial_points(oracle, x[active], active, generator)
            active, start = active[found.found], found.points[found.found]
            if active.numel():
                self._walk(oracle, x, active, start, best, dist, generator, good_enough)
        return best, dist

    def _initial_points(self, oracle: _Oracle, x: Tensor, idx: Tensor,
                        generator: torch.Generator) -> _Found:
        """Uniform noise in the box until it is adversarial, then pulled towards x along the blend."""
        points = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        lo, hi = self.threat.bounds
        for _ in range(self.init_trials):
            trying = (~found & oracle.can_ask(idx)).nonzero().squeeze(1)
            if trying.numel() == 0:
                break
            noise = lo + (hi - lo) * torch.rand(x[trying].shape, generator=generator,
                                                device=x.device, dtype=x.dtype)
            hit = oracle.ask(noise, idx[trying])
            points[trying[hit]] = noise[hit]
            found[trying[hit]] = True
        if found.any():
            keep = found.nonzero().squeeze(1)
            points[keep] = self._bisect(oracle, x[keep], points[keep], idx[keep], "l2",
                                        torch.full((keep.numel(),), _INIT_BLEND_TOLERANCE,
                                                   device=x.device, dtype=_work_dtype(x)))
        return _Found(points, found)

    def _walk(self, oracle: _Oracle, x_all: Tensor, active: Tensor, adv: Tensor, best: Tensor,
              dist: Tensor, generator: torch.Generator, good_enough: float) -> None:
        """The main loop: bisect to the boundary, estimate its normal, step, repeat (in place)."""
        x = x_all[active]
        adv = self._to_boundary(oracle, x, adv, active)
        moved = self.threat.distance(adv, x)  # the first step's delta is 0.1 * box width, not this
        self._record(active, adv, self.threat.distance(adv, x), best, dist)
        theta = self._theta(x)
        # queries kept for the step and bisection: a bisection asks at most one per bit of the
        # fraction theta resolves, and no more than the points' precision can tell apart
        halvings = min(math.ceil(math.log2(1 / theta)), round(-math.log2(torch.finfo(x.dtype).eps)) + 2)
        reserve = halvings + 10
        for t in range(1, self.max_iter + 1):
            room = oracle.remaining(active) - reserve
            evals = room.clamp(max=min(int(self.init_evals * math.sqrt(t)), self.max_evals))
            go = (evals >= 1) & (dist[active] > good_enough)
            if not go.any():
                break
            active, x, adv, moved, evals = active[go], x[go], adv[go], moved[go], evals[go]
            current = self.threat.distance(adv, x)
            delta = (0.1 * (self.threat.bounds[1] - self.threat.bounds[0]) if t == 1
                     else self._delta(moved, theta, x))
            direction = self._normal(oracle, adv, active, evals, delta, generator)
            stepped = self._step(oracle, adv, direction, current / math.sqrt(t), active)
            moved = self.threat.distance(stepped, x)
            adv = self._to_boundary(oracle, x, stepped, active)
            self._record(active, adv, self.threat.distance(adv, x), best, dist)

    def _record(self, idx: Tensor, adv: Tensor, d: Tensor, best: Tensor, dist: Tensor) -> None:
        closer = d < dist[idx]
        best[idx[closer]] = adv[closer]
        dist[idx[closer]] = d[closer]

    # -- the three steps ----------------------------------------------------------------------

    def _theta(self, x: Tensor) -> float:
        d = x[0].numel()
        return self.gamma / (d * math.sqrt(d)) if self.threat.norm == "l2" else self.gamma / d ** 2

    def _delta(self, moved: Tensor, theta: float, x: Tensor) -> Tensor:
        d = x[0].numel()
        scale = math.sqrt(d) if self.threat.norm == "l2" else d
        return (scale * theta * moved).clamp_min(self._smallest_probe(x))

    def _smallest_probe(self, x: Tensor) -> float:
        """The probe radius below which the input's precision would swallow the probes.

        A probe moves each coordinate by about radius / sqrt(d). The authors' radius (moved / d
        under L-inf), computed for float64, falls below a float32 unit in the last place from
        3x32x32 inputs up: the probes rounded to the point itself, the normal estimate came out 0
        and the walk stalled (on 3x64x64 linear models the distances found were 2.6x float64's).
        At _PROBE_ULPS units per coordinate float32 finds what float64 finds.
        """
        lo, hi = self.threat.bounds
        unit = torch.finfo(x.dtype).eps * max(abs(lo), abs(hi))  # a unit in the last place, at most
        return _PROBE_ULPS * unit * math.sqrt(x[0].numel())

    def _to_boundary(self, oracle: _Oracle, x: Tensor, adv: Tensor, idx: Tensor) -> Tensor:
        """Bisect to the boundary with the precision the authors' code uses for this norm."""
        theta = self._theta(x)
        if self.threat.norm == "l2":
            tolerance = torch.full((x.shape[0],), theta, device=x.device, dtype=_work_dtype(x))
        else:
            tolerance = (self.threat.distance(adv, x) * theta).clamp(max=theta)
        return self._bisect(oracle, x, adv, idx, self.threat.norm, tolerance)

    def _bisect(self, oracle: _Oracle, x: Tensor, adv: Tensor, idx: Tensor, norm: str,
                tolerance: Tensor) -> Tensor:
        """Binary search between x (clean side) and adv (adversarial side); returns the adversarial end.

        L2 searches the blend factor in [0, 1]; L-inf the radius of the box around x that adv is
        clipped to, in [0, ||adv - x||_inf]. The ends are kept as points the model judged (adv and
        x to begin with), and the result is the adversarial one: an example whose budget runs out
        keeps its last adversarial end, never a point rebuilt from its fraction, which in half
        precision can round to a different, unjudged point. A midpoint that rounds to one of the
        ends' points takes that end's verdict without a query, and a search whose fraction stops
        narrowing in float32 ends: on large inputs the authors' tolerance (theta) is finer than the
        points' precision, and each halving past it had asked the model about a point it had seen.
        """
        if norm == "l2":
            high = torch.ones(x.shape[0], device=x.device, dtype=_work_dtype(x))
        else:
            high = self.threat.distance(adv, x)
        low = torch.zeros_like(high)
        high_point, low_point = adv.clone(), x.clone()
        settled = torch.zeros_like(high, dtype=torch.bool)
        for _ in range(_MAX_HALVINGS):
            searching = ((high - low) > tolerance) & ~settled & oracle.can_ask(idx)
            rows = searching.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            mid = (high[rows] + low[rows]) / 2
            settled[rows] = (mid <= low[rows]) | (mid >= high[rows])  # no fraction left between the ends
            points = _between(x[rows], adv[rows], mid, norm)
            as_high = (points == high_point[rows]).flatten(1).all(dim=1)
            asked = ~as_high & ~(points == low_point[rows]).flatten(1).all(dim=1)
            hit = as_high.clone()
            if asked.any():
                hit[asked] = oracle.ask(points[asked], idx[rows[asked]])
            high[rows[hit]], high_point[rows[hit]] = mid[hit], points[hit]
            low[rows[~hit]], low_point[rows[~hit]] = mid[~hit], points[~hit]
        return high_point

    def _normal(self, oracle: _Oracle, adv: Tensor, idx: Tensor, evals: Tensor, delta: float | Tensor,
                generator: torch.Generator) -> Tensor:
        """Monte-Carlo estimate of the boundary normal at each ``adv`` (Eq. 14 with the mean baseline),
        as an L2-unit vector (L2) or its sign (L-inf)."""
        delta = torch.as_tensor(delta, dtype=adv.dtype, device=adv.device).expand(adv.shape[0])
        most = int(evals.max())
        per_block = max(1, _SAMPLE_ELEMENTS // (most * adv[0].numel()))
        parts = [self._normal_block(oracle, adv[s], idx[s], evals[s], delta[s], most, generator)
                 for s in (slice(i, i + per_block) for i in range(0, adv.shape[0], per_block))]
        grad = torch.cat(parts)
        if self.threat.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / norms.reshape(-1, *([1] * (grad.dim() - 1)))

    def _normal_block(self, oracle: _Oracle, adv: Tensor, idx: Tensor, evals: Tensor, delta: Tensor,
                      most: int, generator: torch.Generator) -> Tensor:
        n, shape = adv.shape[0], adv.shape[1:]
        size = (n, most, *shape)
        if self.threat.norm == "l2":
            noise = torch.randn(size, generator=generator, device=adv.device, dtype=adv.dtype)
        else:
            noise = 2 * torch.rand(size, generator=generator, device=adv.device, dtype=adv.dtype) - 1
        noise = noise / noise.flatten(2).norm(dim=2).clamp_min(1e-12).reshape(n, most, *([1] * len(shape)))
        spread = delta.reshape(n, 1, *([1] * len(shape)))
        centre = adv.unsqueeze(1).expand(size)
        probes = self._box.project(centre + spread * noise, centre)
        noise = (probes - centre) / spread  # the direction actually probed, after the box clip
        used = torch.arange(most, device=adv.device)[None, :] < evals[:, None]  # (n, most)
        owners = idx[:, None].expand(n, most)[used]
        labels = torch.zeros(n, most, dtype=adv.dtype, device=adv.device)
        labels[used] = 2 * oracle.ask(probes[used], owners).to(adv.dtype) - 1
        mean = labels.sum(dim=1, keepdim=True) / evals[:, None]
        # the baseline lowers the variance, except when every label agrees (it would cancel them)
        unanimous = mean.abs() == 1
        weights = torch.where(unanimous, labels, (labels - mean) * used)
        weights = weights.reshape(n, most, *([1] * len(shape)))
        return (weights * noise).sum(dim=1) / evals.reshape(n, *([1] * len(shape)))

    def _step(self, oracle: _Oracle, adv: Tensor, direction: Tensor, size: Tensor, idx: Tensor) -> Tensor:
        """Geometric step-size search: halve the step until the stepped point is adversarial.

        An example that finds no adversarial step within its budget stays where it is.
        """
        size = size.clone()
        accepted = torch.zeros(adv.shape[0], dtype=torch.bool, device=adv.device)
        for _ in range(_MAX_HALVINGS):
            trying = (~accepted & oracle.can_ask(idx)).nonzero().squeeze(1)
            if trying.numel() == 0:
                break
            hit = oracle.ask(self._stepped(adv[trying], direction[trying], size[trying]), idx[trying])
            accepted[trying[hit]] = True
            size[trying[~hit]] /= 2
        stepped = self._stepped(adv, direction, size)
        return torch.where(accepted.reshape(-1, *([1] * (adv.dim() - 1))), stepped, adv)

    def _stepped(self, adv: Tensor, direction: Tensor, size: Tensor) -> Tensor:
        moved = adv + size.reshape(-1, *([1] * (adv.dim() - 1))).to(adv.dtype) * direction
        return self._box.project(moved, adv)


ATTACKS.add("hopskipjump", HopSkipJump)


# -- helpers ------------------------------------------------------------------------------------

@dataclass
class _Found:
    """Starting points and whether each example has one."""

    points: Tensor
    found: Tensor


class _Oracle:
    """The model as a decision-based attacker sees it: is this point misclassified? One query per row."""

    def __init__(self, model: nn.Module, y: Tensor, budget: int, batch_size: int) -> None:
        self.model, self.y, self.budget, self.batch_size = model, y, budget, batch_size
        self.queries = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)

    def remaining(self, idx: Tensor) -> Tensor:
        return self.budget - self.queries[idx]

    def can_ask(self, idx: Tensor) -> Tensor:
        return self.queries[idx] < self.budget

    def ask_clean(self, x: Tensor) -> Tensor:
        """``ask`` for every example at its clean input, which first checks that each label names
        one of the model's classes: a label past them would make every point look misclassified."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=x.device)
        logits = self._logits(x)
        check_label_range(self.y, logits.shape[1])
        self.queries += 1
        return predicted_class(logits) != self.y  # a NaN row predicts no class: misclassified

    def ask(self, points: Tensor, owners: Tensor) -> Tensor:
        """Per row: the label differs from the owner's true label, beyond float rounding (the
        search ends on the boundary, where a point that fools by less may be judged correct in a
        batch of another size). Counts one query per row."""
        if points.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=points.device)
        fooled = fooled_beyond_rounding(self._logits(points), self.y[owners])
        self.queries.index_add_(0, owners, torch.ones_like(owners))
        return fooled

    def _logits(self, points: Tensor) -> Tensor:
        return torch.cat([self.model(chunk) for chunk in points.split(self.batch_size)])


def _between(x: Tensor, adv: Tensor, amount: Tensor, norm: str) -> Tensor:
    """The point ``amount`` along the search path from x to adv (blend for L2, clip radius for L-inf)."""
    amount = amount.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    if norm == "l2":
        return (1 - amount) * x + amount * adv
    return x + (adv - x).clamp(-amount, amount)


def _work_dtype(x: Tensor) -> torch.dtype:
    """Distances and search fractions carry at least float32 precision (as ThreatModel.distance)."""
    return torch.promote_types(x.dtype, torch.float32)
