"""Carlini-Wagner L2 (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural Networks").

The attack minimises ``||x' - x||_2^2 + c * f(x')`` with Adam, where
``f(x') = max(z_y(x') - max_{i != y} z_i(x'), -kappa)`` (targeted: ``max(max_{i != t} z_i - z_t, -kappa)``).
The box is removed by the change of variables ``x' = mid + half * tanh(w)``, and ``c`` is set per
example by binary search: halved towards the last failure after a success, multiplied by ten
until the first success. Across all rounds the attack keeps, per example, the adversarial point
with the smallest L2 distance.

The paper starts every round from ``x``. With ``warm_start`` a round starts where the example's
previous round ended instead: after a success that is a point near the boundary, which the smaller
constant then pulls towards ``x`` along it; after a failure, the larger constant continues the
push rather than repeating it. With few Adam steps per round this finds smaller norms for the
same passes (docs/PERFORMANCE.md); the default keeps the paper's restarts, and its points.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, check_positive_int
from fortify.attacks.fmn import MinimalNormAttack, logit_margin
from fortify.errors import ConfigError
from fortify.threat import ThreatModel

# a const above this has never been bracketed by a success, so the search still scales it up
_UNBOUNDED = 1e10


class CarliniWagnerL2(MinimalNormAttack):
    """C&W L2 with the paper's defaults (learning rate 1e-2, initial c 1e-3, 9 binary-search steps).

    The reference code runs up to 10,000 Adam steps per round and aborts a round early when the
    loss stops falling; ``steps`` defaults to 1,000 here, which the early abort rarely reaches.
    """

    name = "cw"
    supported_norms = ("l2",)

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 1000,
        binary_search_steps: int = 9,
        initial_const: float = 1e-3,
        learning_rate: float = 1e-2,
        confidence: float = 0.0,
        abort_early: bool = True,
        warm_start: bool = False,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.steps = check_positive_int("steps", steps)
        self.binary_search_steps = check_positive_int("binary_search_steps", binary_search_steps)
        for name, value in (("initial_const", initial_const), ("learning_rate", learning_rate)):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if not confidence >= 0:
            raise ConfigError(f"confidence (kappa) must be >= 0, got {confidence!r}")
        self.initial_const = float(initial_const)
        self.learning_rate = float(learning_rate)
        self.confidence = float(confidence)
        self.abort_early = abort_early
        self.warm_start = warm_start

    @property
    def label(self) -> str:
        # warm rounds find other points than restarted ones at the same budget: a label of their own
        # lets one evaluation run and report both
        warm = "-warm" if self.warm_start else ""
        return f"{self.name}-{self.binary_search_steps}x{self.steps}{warm}"

    @property
    def earlier_labels(self) -> tuple[str, ...]:
        # before the suffix a warm run was labelled like a restarted one (describe() tells them apart)
        return (f"{self.name}-{self.binary_search_steps}x{self.steps}",) if self.warm_start else ()

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "steps": self.steps, "binary_search_steps": self.binary_search_steps,
                "initial_const": self.initial_const, "learning_rate": self.learning_rate,
                "confidence": self.confidence, "abort_early": self.abort_early,
                # only when set, so that journals and results of the paper's algorithm keep their settings
                **({"warm_start": True} if self.warm_start else {})}

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        # the search runs in float32 at least: in float16 the 'unbounded' constant overflows, and
        # atanh of a pixel on a box face is infinite (1 - 1e-6 rounds to 1), which freezes that pixel
        work = torch.promote_types(x.dtype, torch.float32)
        w_start = self._to_tanh_space(x.to(work))
        const = torch.full((n,), self.initial_const, dtype=work, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, _UNBOUNDED)
        best, best_norm = x.clone(), torch.full_like(const, torch.inf)
        # the tanh change of variables cannot return x itself, so an input that is already fooled
        # is recorded at distance 0 before the search
        with torch.no_grad():
            every = torch.arange(n, device=x.device)
            self._keep_smaller(every, x, torch.zeros_like(const), self._fooled(model(x), y, target), best,
                               best_norm)
        w_round = w_start
        for round_ in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and round_ == self.binary_search_steps - 1:
                # the reference code (and Foolbox) end a long search with one more round at each
                # example's upper bound: the smallest constant known to fool it, 1e10 where none did
                const = upper.clone()
            success, w_end = self._optimise(model, x, y, target, w_round, const, best, best_norm)
            if self.warm_start:
                w_round = w_end
            upper = torch.where(success, torch.minimum(upper, const), upper)
            lower = torch.where(success, lower, torch.maximum(lower, const))
            bracketed = upper < _UNBOUNDED
            const = torch.where(bracketed, (lower + upper) / 2, const * 10)
        return best, torch.isfinite(best_norm)

    def _optimise(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, w_start: Tensor,
                  const: Tensor, best: Tensor, best_norm: Tensor) -> tuple[Tensor, Tensor]:
        """One Adam run at fixed ``const`` from ``w_start``; updates ``best``/``best_norm`` in place.

        Returns the successes and, under ``warm_start``, where each example's run ended in tanh space
        (``w_start`` for the examples it left out); without it ``w_start`` itself, which is not read.

        An input fooled as given (distance 0) cannot get closer and is left out. With ``abort_early``
        the round stops once the summed loss fell by less than 0.01% since the last check, as in the
        reference code. (The same rule per example, tried, stops examples whose loss merely
        oscillates: on digits it left a third of the found norms larger.)
        """
        label, sign = self._label_and_sign(y, target)
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        active = (best_norm > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            return success, w_start
        x_a, y_a, w_a, label_a, const_a = x[active], y[active], w_start[active], label[active], const[active]
        target_a = None if target is None else target[active]
        modifier = torch.zeros_like(w_a, requires_grad=True)  # in the search's precision, not x's
        # fused: one kernel per step instead of a handful of element-wise ops (CPU and CUDA)
        optimiser = torch.optim.Adam([modifier], lr=self.learning_rate,
                                     fused=True if modifier.device.type in ("cpu", "cuda") else None)
        check_every = max(self.steps // 10, 1)
        previous = torch.inf
        for step in range(self.steps):
            candidate = self._from_tanh_space(w_a + modifier).to(x.dtype)  # the model sees x's dtype
            logits = model(candidate)
            distance_sq = (candidate - x_a).flatten(1).to(w_a.dtype).pow(2).sum(dim=1)
            margin = sign * logit_margin(logits, label_a)  # negative once the model is fooled
            # Carlini's f6 with confidence kappa, max(margin + kappa, 0): 0 once fooled by kappa, so
            # the early abort below compares the losses the reference compares
            loss = distance_sq + const_a * (margin + self.confidence).clamp_min(0)
            # autograd.grad rather than backward: the model's own .grad must stay untouched
            (modifier.grad,) = torch.autograd.grad(loss.sum(), modifier)
            optimiser.step()
            fooled = self._fooled(logits.detach(), y_a, target_a)
            self._keep_smaller(active, candidate.detach(), distance_sq.detach().sqrt(), fooled, best,
                               best_norm)
            # a warm round's first point is where the last round, at another constant, ended: it
            # says nothing of whether this constant finds an adversarial point, so it is kept as
            # a candidate but does not count as the round's success
            if step > 0 or not self.warm_start:
                success[active] |= fooled
            if self.abort_early and step % check_every == 0:
                total = loss.sum().item()
                if total > previous * 0.9999:
                    break
                previous = total
        if not self.warm_start:
            return success, w_start
        w_end = w_start.clone()
        w_end[active] = (w_a + modifier).detach()
        return success, w_end

    def _fooled(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Misclassified (or on target) with at least ``confidence`` logit margin, and by more than
        float rounding: C&W lands its points at the boundary, where a batch of another size could
        judge a point that fools by less correct."""
        label, sign = self._label_and_sign(y, target)
        margin = sign * logit_margin(logits, label)
        return self.succeeded_beyond_rounding(logits, y, target) & (margin <= -self.confidence)

    @staticmethod
    def _keep_smaller(rows: Tensor, candidate: Tensor, norms: Tensor, fooled: Tensor, best: Tensor,
                      best_norm: Tensor) -> None:
        """Where ``fooled`` and closer than the best so far, store the candidate in ``best[rows]``."""
        # torch.where rather than a boolean index: no host sync per step on a GPU
        better = fooled & (norms < best_norm[rows])
        best[rows] = torch.where(better.reshape(-1, *([1] * (best.dim() - 1))), candidate, best[rows])
        best_norm[rows] = torch.where(better, norms, best_norm[rows])

    def _to_tanh_space(self, x: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        # shrinking by 1e-6 keeps atanh finite for pixels on the box faces (reference code does the same)
        return torch.atanh((x - mid) / half * (1 - 1e-6))

    def _from_tanh_space(self, w: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        return mid + half * torch.tanh(w)


ATTACKS.add("cw", CarliniWagnerL2)
