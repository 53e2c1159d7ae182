"""PGD (Madry et al. 2018): projected steepest ascent on the loss, with restarts.

Per example the attack returns the first iterate that fools the model (of any restart); an example
that never falls gets the final iterate with the highest loss across restarts. Because a fooled
example's answer is fixed at that moment, ``early_stop=True`` may drop it from the batch and save its
remaining passes without changing any returned point. ``keep_first_success=False`` gives the plain
Madry variant used inside adversarial training: the final iterate of the highest-loss restart.
With more than one restart a last forward pass judges each restart's final iterate (fooled, and its
loss); with one restart that pass would change no returned point, and it is skipped.

``probe=True`` also tries, once per restart, the corner that a full FGSM step from the clean input
reaches along the gradient PGD has just taken at its random start: one forward pass without a
backward. A probe that fools the model is kept as that example's answer; every other example goes
on through exactly the iterates it would have without the probe, so with one restart the probe can
only add fooled examples. Against a model that falls to FGSM most examples leave after this first
pass instead of after the few steps of size ``step_size`` it takes to cross the ball.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, check_positive_int
from fortify.errors import ConfigError
from fortify.threat import ThreatModel


@dataclass
class _Restart:
    """Outcome of one restart on a subset of the batch."""

    x_adv: Tensor
    found: Tensor
    loss: Tensor


class PGD(Attack):
    name = "pgd"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        early_stop: bool = False,
        probe: bool = False,
        keep_first_success: bool = True,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        # 2.5 * eps / steps lets the iterate cross the ball and come back (Madry et al. 2018)
        self.step_size = 2.5 * threat.eps / self.steps if step_size is None else float(step_size)
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ConfigError(f"step_size must be a finite number > 0, got {step_size!r}")
        if self.restarts > 1 and not random_start:
            # every restart would start from x and repeat the first run, at restarts times its cost
            raise ConfigError(f"restarts={self.restarts} needs random_start: without it each restart "
                              "repeats the first run")
        if early_stop and not keep_first_success:
            raise ConfigError("early_stop needs keep_first_success=True (a fooled example is final)")
        if probe and not keep_first_success:
            raise ConfigError("probe needs keep_first_success=True (its hits are answers, not iterates)")
        self.random_start = random_start
        self.early_stop = early_stop
        self.probe = probe
        self.keep_first_success = keep_first_success

    def with_threat(self, threat: ThreatModel) -> PGD:
        clone = super().with_threat(threat)
        assert isinstance(clone, PGD)
        clone.step_size = self.step_size * threat.eps / self.threat.eps
        return clone

    @property
    def label(self) -> str:
        suffix = f"x{self.restarts}" if self.restarts > 1 else ""
        return f"{self.name}-{self.steps}{suffix}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size,
                "restarts": self.restarts, "random_start": self.random_start, "probe": self.probe,
                "keep_first_success": self.keep_first_success}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        if self.restarts == 1:  # nothing to compare the final iterate with: no pass to judge it
            return self._restart(model, x, y, target, generator, judge_final=False).x_adv
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
        for _ in range(self.restarts):
            todo = (~found).nonzero().squeeze(1) if self.keep_first_success else None
            if todo is not None and todo.numel() == 0:
                break  # every example is already fooled: further restarts cannot change anything
            sub = slice(None) if todo is None else todo
            run = self._restart(model, x[sub], y[sub], None if target is None else target[sub],
                                generator)
            idx = torch.arange(x.shape[0], device=x.device) if todo is None else todo
            better = run.found | (~run.found & (run.loss > best_loss[idx]))
            take = idx[better]
            best[take] = run.x_adv[better]
            best_loss[take] = run.loss[better]
            found[idx[run.found]] = True
        return best

    def _restart(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                 generator: torch.Generator, judge_final: bool = True) -> _Restart:
        """One restart. Without ``judge_final`` the last iterate is returned unjudged: an example it
        fools returns it as its first hit anyway, so only ``found`` and ``loss`` miss that pass."""
        n = x.shape[0]
        x_adv = self.threat.random_start(x, generator) if self.random_start else x.clone()
        first_hit = x_adv.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        final_loss = torch.full((n,), -torch.inf, device=x.device)
        active = torch.arange(n, device=x.device)
        for step in range(self.steps):
            tgt = None if target is None else target[active]
            point = x_adv[active].requires_grad_(True)
            grad, logits = self.gradient_and_logits(model, point, y[active], tgt)
            if self.keep_first_success:
                self._record_hits(point.detach(), logits.detach(), y[active], tgt, active,
                                  found, first_hit)
            if self.probe and step == 0:
                self._probe(model, x, y, target, grad, active, found, first_hit)
            stepped = point.detach() + self.step_size * self.threat.ascent_direction(grad)
            x_adv[active] = self.threat.project(stepped, x[active])
            if self.early_stop:
                active = active[~found[active]]
                if active.numel() == 0:
                    break
        if judge_final and active.numel():  # the final iterate's loss, and whether it fools
            tgt, final = None if target is None else target[active], x_adv[active]
            with torch.no_grad():
                loss, logits = self.loss_and_logits(model, final, y[active], tgt)
            if self.keep_first_success:
                self._record_hits(final, logits, y[active], tgt, active, found, first_hit)
            final_loss[active] = loss.float()
        fooled_mask = found.reshape(-1, *([1] * (x.dim() - 1)))
        return _Restart(torch.where(fooled_mask, first_hit, x_adv), found, final_loss)

    def _probe(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, grad: Tensor,
               active: Tensor, found: Tensor, first_hit: Tensor) -> None:
        """Try the full step ``eps`` from the clean input along ``grad``; record what it fools."""
        open_ = ~found[active]
        idx = active[open_]
        if idx.numel() == 0:
            return
        corner = x[idx] + self.threat.eps * self.threat.ascent_direction(grad[open_])
        corner = self.threat.project(corner, x[idx])
        tgt = None if target is None else target[idx]
        with torch.no_grad():
            _, logits = self.loss_and_logits(model, corner, y[idx], tgt)
        self._record_hits(corner, logits, y[idx], tgt, idx, found, first_hit)

    def _record_hits(self, point: Tensor, logits: Tensor, y: Tensor, target: Tensor | None,
                     active: Tensor, found: Tensor, first_hit: Tensor) -> None:
        """Store each example's first fooling iterate (in place)."""
        new = self.succeeded(logits, y, target) & ~found[active]
        mask = new.reshape(-1, *([1] * (point.dim() - 1)))
        first_hit[active] = torch.where(mask, point, first_hit[active])
        found[active] = found[active] | new


ATTACKS.add("pgd", PGD)
