"""FMN (Pintor et al. 2021, "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints").

A minimal-norm attack searches for the smallest perturbation that fools the model rather than the
most damaging one inside a fixed ball. FMN takes normalised gradient steps on the logit difference
and projects onto an eps-ball whose radius adapts per example: it grows by a factor ``1 + gamma``
while the iterate is still correct and shrinks by ``1 - gamma`` (never above the best norm found)
once it fools the model; until the first success it may also jump further, to a first-order estimate
of the distance to the decision boundary. ``gamma`` and the step ``alpha`` are cosine-annealed.
Two additions to the paper's Algorithm 1: that growth floor before the first success (see
``FMN._next_radius``; on the tests' standard digits model it fools all 196 correctly classified
digits of the first 200 test digits in 50 L2 steps, where the paper's rule left 109 unfooled after
100, its stalled iterates held back by the box; under L-inf both fool all), and one last forward
pass that checks the point reached by the final step.

``MinimalNormAttack`` holds what FMN and Carlini-Wagner share: ``minimal`` returns the smallest
adversarial point per example with its norm (``inf`` and ``x`` itself when none was found), and
``perturb`` keeps that point only when its norm is within the threat model's eps.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, attacking, check_positive_int, diagnose_failure
from fortify.errors import ConfigError
from fortify.threat import ThreatModel


def box_only(threat: ThreatModel) -> ThreatModel:
    """A threat model whose projection is the plain box clip.

    An L-inf ball as wide as the box cannot bind: any coordinate it would clamp is clipped to
    the box face anyway, because the clean input lies in the box.
    """
    lo, hi = threat.bounds
    return ThreatModel("linf", hi - lo, threat.bounds)


def logit_margin(logits: Tensor, label: Tensor) -> Tensor:
    """Per-example ``z_label - max_{j != label} z_j``: negative once another class wins."""
    own = logits.gather(1, label.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, label.unsqueeze(1), -torch.inf)
    return own - others.amax(dim=1)


def _expand(per_example: Tensor, like: Tensor) -> Tensor:
    return per_example.reshape(-1, *([1] * (like.dim() - 1)))


class MinimalNormAttack(Attack):
    """An attack that finds, per example, the smallest adversarial perturbation it can.

    FMN and C&W start from ``x`` itself and draw nothing at random; they accept the generator to
    keep the common contract.
    """

    keeps_feature_schema = False  # they measure and step in the plain norm

    def minimal(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Smallest adversarial point per example and its norm, whatever the threat model's eps.

        Returns ``(x_adv, norms)``: ``x_adv`` lies in the box; ``norms`` is ``inf`` (and ``x_adv``
        equals ``x``) where no adversarial point was found, and 0 where ``x`` is already fooled.
        """
        self._check_batch(x, y, target)
        with attacking(model):
            self._check_target_classes(model, x, target)
            try:
                x_adv, found = self._search(model, x.detach(), y, target, self.seeded(x, generator))
            except (IndexError, RuntimeError) as err:  # name the caller's mistake, as ``run`` does
                diagnose_failure(model, x, y, err)
                raise
        x_adv = x_adv.detach()
        norms = self.threat.distance(x_adv, x)
        return x_adv, torch.where(found, norms, torch.full_like(norms, torch.inf))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        x_adv, found = self._search(model, x, y, target, generator)
        x_adv = x_adv.detach()
        # kept as found, not re-projected: a rounding step could move a point off the boundary's far side
        keep = found & (self.threat.distance(x_adv, x) <= self.threat.eps) & self.threat.contains(x_adv, x)
        return torch.where(_expand(keep, x), x_adv, x)

    @abstractmethod
    def _search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Return the smallest adversarial points found (inside the box) and a per-example found flag."""

    def _label_and_sign(self, y: Tensor, target: Tensor | None) -> tuple[Tensor, float]:
        """The class whose margin the attack drives and the sign that makes 'fooled' negative."""
        if self.targeted:
            assert target is not None
            return target, -1.0
        return y, 1.0


class FMN(MinimalNormAttack):
    """Fast Minimum-Norm attack for L-inf and L2 (Pintor et al. 2021, Algorithm 1).

    Defaults follow the paper: ``gamma`` annealed from 0.05 to 0.001, ``alpha`` from ``alpha_init``
    (10 for L-inf, 1 for L2) to ``alpha_init / 100``. Steps are along the L2-normalised gradient
    for both norms; under L-inf the projection then clips the step to the current radius.
    """

    name = "fmn"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        alpha_init: float | None = None,
        alpha_final: float | None = None,
        gamma_init: float = 0.05,
        gamma_final: float = 0.001,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.steps = check_positive_int("steps", steps)
        # the paper's step sizes are for a [0, 1] box: scaled with its width (the same problem in a
        # [0, 255] box had found 66 of 100 points at L2, in [0, 1] all 100)
        low, high = threat.bounds
        default_alpha = (10.0 if threat.norm == "linf" else 1.0) * (high - low)
        self.alpha_init = default_alpha if alpha_init is None else float(alpha_init)
        self.alpha_final = self.alpha_init / 100 if alpha_final is None else float(alpha_final)
        if not (self.alpha_init > 0 and self.alpha_final > 0):
            raise ConfigError(f"alpha_init and alpha_final must be > 0, got {alpha_init!r}, {alpha_final!r}")
        if not 0 < gamma_final <= gamma_init < 1:
            raise ConfigError(f"need 0 < gamma_final <= gamma_init < 1, got gamma_init={gamma_init!r}, "
                              f"gamma_final={gamma_final!r}")
        self.gamma_init, self.gamma_final = float(gamma_init), float(gamma_final)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.steps}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "steps": self.steps, "alpha_init": self.alpha_init,
                "alpha_final": self.alpha_final, "gamma_init": self.gamma_init,
                "gamma_final": self.gamma_final}

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        label, sign = self._label_and_sign(y, target)
        n = x.shape[0]
        box = box_only(self.threat)
        current = x.clone()
        # radii and norms in at least float32: in bfloat16 ``radius * (1 - gamma)`` rounds back to
        # ``radius`` once gamma drops below 2^-9, and the annealed radius would stop shrinking
        radius = torch.zeros(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        best, best_norm = x.clone(), torch.full_like(radius, torch.inf)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        worst = self._farthest_box_distance(x)
        # steps + 1 evaluations: the point reached by the last step is checked too
        for step in range(self.steps + 1):
            last = step == self.steps  # the last point is only judged: no gradient needed
            point = current.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(point)
                # ascending this loss leaves the label's region; it turns positive once fooled
                loss = -sign * logit_margin(logits, label)
            grad = None if last else torch.autograd.grad(loss.sum(), point)[0]
            point, logits, loss = point.detach(), logits.detach(), loss.detach()
            norm_now = self.threat.distance(point, x).to(radius.dtype)
            # a success counts, for the radius and the record alike, only where a batch of another size
            # would judge the point adversarial too: in bfloat16 that margin is 3% of the largest
            # logit, which a radius steering by the plain boundary seldom crossed (1-4 of 100 found)
            fooled = self.succeeded_beyond_rounding(logits, y, target)
            better = fooled & (norm_now < best_norm)
            best = torch.where(_expand(better, x), point, best)
            best_norm = torch.where(better, norm_now, best_norm)
            found |= fooled
            if grad is None:
                break
            alpha, gamma = self._schedule(step)
            radius = self._next_radius(radius, norm_now, best_norm, loss, grad, fooled, found, gamma)
            radius = torch.minimum(radius, worst)
            stepped = point + alpha * self._unit_l2(grad)
            current = box.project(x + self._project_ball(stepped - x, radius), x)
        return best, torch.isfinite(best_norm)

    def _schedule(self, step: int) -> tuple[float, float]:
        """Cosine-annealed step size and radius factor for this step."""
        cosine = (1 + math.cos(math.pi * step / self.steps)) / 2
        alpha = self.alpha_final + (self.alpha_init - self.alpha_final) * cosine
        gamma = self.gamma_final + (self.gamma_init - self.gamma_final) * cosine
        return alpha, gamma

    def _next_radius(self, radius: Tensor, norm_now: Tensor, best_norm: Tensor, loss: Tensor,
                     grad: Tensor, fooled: Tensor, found: Tensor, gamma: float) -> Tensor:
        """Grow by ``1 + gamma`` while correct, shrink by ``1 - gamma`` once fooled.

        Before the first success the radius also jumps to the linearised boundary distance when that
        is larger. The paper sets it to that estimate alone; the ``1 + gamma`` floor keeps it growing
        where the estimate stalls: on a linear boundary the estimate is exact and the iterate can
        rest on its correct side by rounding, and against a box face the clipped iterate never
        reaches the radius, so an estimate measured from it repeats itself.
        """
        dual = 1 if self.threat.norm == "linf" else 2
        grad_dual = grad.reshape(grad.shape[0], -1).norm(p=dual, dim=1).clamp_min(1e-12)
        to_boundary = norm_now + loss.to(radius.dtype).abs() / grad_dual.to(radius.dtype)
        grow = radius * (1 + gamma)
        grow = torch.where(found, grow, torch.maximum(grow, to_boundary))
        shrink = torch.minimum(radius * (1 - gamma), best_norm)
        return torch.where(fooled, shrink, grow)

    def _project_ball(self, delta: Tensor, radius: Tensor) -> Tensor:
        """Project each ``delta`` onto the ball of its own radius.

        ThreatModel holds one scalar eps, so the ball of radius r is reached as r times the
        projection of ``delta / r`` onto the unit ball. The unit ball lies inside [-1, 1]^d, so that
        threat model's box clip never binds and its projection is the pure ball projection.
        """
        unit_ball = ThreatModel(self.threat.norm, 1.0, (-1.0, 1.0))
        positive = radius > 0
        scale = _expand(torch.where(positive, radius, torch.ones_like(radius)), delta)
        unit = (delta / scale).to(delta.dtype)
        projected = (unit_ball.project(unit, torch.zeros_like(unit)) * scale).to(delta.dtype)
        return torch.where(_expand(positive, delta), projected, torch.zeros_like(delta))

    def _farthest_box_distance(self, x: Tensor) -> Tensor:
        """Distance from ``x`` to the farthest box corner: no radius beyond it can help."""
        lo, hi = self.threat.bounds
        corner = torch.where(x - lo > hi - x, torch.full_like(x, lo), torch.full_like(x, hi))
        return self.threat.distance(corner, x).to(torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def _unit_l2(grad: Tensor) -> Tensor:
        norms = grad.reshape(grad.shape[0], -1).norm(p=2, dim=1).clamp_min(1e-12)
        return grad / _expand(norms, grad)


ATTACKS.add("fmn", FMN)
