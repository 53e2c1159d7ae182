"""APGD (Croce & Hein 2020): PGD that sets its own step size, with momentum and restarts.

F. Croce and M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, Algorithm 1. The step size starts at 2 * eps. Once the iterate
``x_{w_j}`` is computed, at checkpoints ``w_j = ceil(p_j * n_iter)`` with ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, an example's step is halved, and its iterate moved
back to its best point so far, when

1. fewer than ``rho`` (0.75) of its ``w_j - w_{j-1}`` steps since the last checkpoint raised its
   loss (``f(x_{m+1}) > f(x_m)`` for ``w_{j-1} <= m < w_j``), or
2. its step was not halved at the last checkpoint and its best loss has not grown since.

After a halving the loss of the restored point is the one the next step must beat.

Each step is ``z = P(x_k + eta * d(grad))``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
with ``a = 0.75`` (the first step has no momentum), ``d`` the threat model's steepest-ascent
direction and ``P`` its projection.

Per example the attack returns the first iterate that fools the model (of any restart), otherwise
the point with the highest loss. Restarts only attack the examples still standing, and
``early_stop=True`` drops an example from the batch once it is fooled, which saves passes without
changing any returned point. The logits of the gradient pass decide success: no pass is spent on
bookkeeping.

``APGDTargeted`` is APGD-T: for each of the ``n_target_classes`` non-true classes with the highest
clean logits, in turn, APGD on the targeted DLR loss towards that class, on the examples not yet
fooled (fooled meaning, as for the untargeted attacks, a prediction other than the label).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, check_positive_int, top_target_classes
from fortify.errors import ConfigError
from fortify.models.predictions import at_least_fp32, predicted_class
from fortify.threat import ThreatModel

LOSSES: tuple[str, ...] = ("ce", "dlr")
MOMENTUM = 0.75
INITIAL_STEP = 2.0  # times eps (paper, section 3.2)
# Checkpoint schedule in hundredths of the budget, kept in integers so that 0.22 * 100 is exactly 22
FIRST_CHECKPOINT, INTERVAL_SHRINK, MIN_INTERVAL = 22, 3, 6
DLR_EPS = 1e-12  # keeps the DLR ratio finite when the top logits tie


def checkpoints(n_iter: int) -> dict[int, int]:
    """Map each checkpoint iteration ``w_j`` (j >= 1) to its window ``w_j - w_{j-1}``.

    Small budgets can round two checkpoints onto one iteration; those merge.
    """
    marks: dict[int, int] = {}
    previous_p, p, previous_w = 0, FIRST_CHECKPOINT, 0
    while p <= 100:
        w = -(-p * n_iter // 100)  # ceil(p / 100 * n_iter) in integers
        if w > previous_w:
            marks[w] = w - previous_w
            previous_w = w
        previous_p, p = p, p + max(p - previous_p - INTERVAL_SHRINK, MIN_INTERVAL)
    return marks


def _check_classes(logits: Tensor, needed: int, loss: str) -> None:
    if logits.shape[1] < needed:
        raise ConfigError(f"the {loss} loss needs a model with at least {needed} classes, "
                          f"this one has {logits.shape[1]}")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, per example.

    ``pi`` orders the logits from largest to smallest. The ratio is invariant to shifting and
    scaling the logits, so it cannot be fooled by a model that merely inflates them.
    """
    _check_classes(logits, 3, "DLR")
    logits = at_least_fp32(logits)  # DLR_EPS is 0 in float16: tied top logits gave 0 / 0
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return -(true - others) / (top[:, 0] - top[:, 2] + DLR_EPS)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, per example."""
    _check_classes(logits, 4, "targeted DLR")
    logits = at_least_fp32(logits)
    top = logits.topk(4, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    wanted = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - wanted) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_EPS)


def dlr_to_target_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DLR towards a target: ``-(max_{j != t} z_j - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, per example.

    The loss of a genuinely targeted attack, whose success is ``argmax z == t``: it rises until the
    target beats every other class, the runner-up being whichever non-target class leads, not
    necessarily the true one. (``dlr_targeted_loss`` pulls ``z_t`` past ``z_y`` only, which is what
    APGD-T needs, since any misclassification is its success.)
    """
    _check_classes(logits, 4, "targeted DLR")
    logits = at_least_fp32(logits)
    top = logits.topk(4, dim=1).values
    wanted = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], -torch.inf).amax(dim=1)
    return -(others - wanted) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_EPS)


def _expand(per_example: Tensor, like: Tensor) -> Tensor:
    return per_example.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Outcome:
    """Per example: the point to return, whether it fools the model, and its loss if not."""

    x_adv: Tensor
    found: Tensor
    loss: Tensor

    @classmethod
    def start(cls, x: Tensor) -> _Outcome:
        n = x.shape[0]
        return cls(x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device),
                   torch.full((n,), -torch.inf, device=x.device, dtype=torch.float64))

    def merge(self, index: Tensor, run: _Outcome) -> None:
        """Take a run's fooling points, and its best points where they beat the stored loss."""
        take = run.found | (run.loss > self.loss[index])
        self.x_adv[index[take]] = run.x_adv[take]
        self.loss[index[take]] = run.loss[take]
        self.found[index[run.found]] = True


@dataclass
class _Search:
    """State of one APGD run for the examples still being attacked (row i is example index[i])."""

    index: Tensor
    x_nat: Tensor
    y: Tensor
    target: Tensor | None
    x: Tensor  # x_k
    x_prev: Tensor  # x_{k-1}, for the momentum term
    grad: Tensor
    loss: Tensor
    step: Tensor  # eta, per example
    x_best: Tensor
    grad_best: Tensor
    loss_best: Tensor
    loss_best_at_check: Tensor
    halved_at_check: Tensor
    increases: Tensor  # steps since the last checkpoint that raised the loss

    def keep(self, mask: Tensor) -> _Search:
        return _Search(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[mask]
                          for f in fields(self)})


class APGD(Attack):
    """Untargeted APGD on the cross-entropy (``loss="ce"``) or DLR (``loss="dlr"``) loss.

    With ``targeted=True`` it moves towards the given ``target`` labels instead (CE towards the
    target, or DLR towards it, ``dlr_to_target_loss``) and succeeds when the prediction equals the
    target. (``APGDTargeted`` is the other kind: it counts any misclassification as success.)
    """

    name = "apgd"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss: str = "ce",
        n_iter: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = False,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        if loss not in LOSSES:
            raise ConfigError(f"unknown APGD loss {loss!r}; valid losses: {', '.join(LOSSES)}")
        if not 0 < rho <= 1:
            raise ConfigError(f"rho must be in (0, 1], got {rho!r}")
        self.loss = loss
        self.n_iter = check_positive_int("n_iter", n_iter)
        self.restarts = check_positive_int("restarts", restarts)
        self.rho = float(rho)
        self.early_stop = early_stop

    @property
    def label(self) -> str:
        # the iterations too, as PGD's and FAB's labels say theirs: runs of 2 and of 100 iterations
        # had shared one column in `fortify compare`
        suffix = f"x{self.restarts}" if self.restarts > 1 else ""
        return f"{self.name}-{self.loss}-{self.n_iter}{suffix}"

    @property
    def earlier_labels(self) -> tuple[str, ...]:
        suffix = f"x{self.restarts}" if self.restarts > 1 else ""
        return (f"{self.name}-{self.loss}{suffix}",)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "loss": self.loss, "n_iter": self.n_iter,
                "restarts": self.restarts, "rho": self.rho}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        outcome = _Outcome.start(x)
        self._attack_with_restarts(model, x, y, target, generator, outcome)
        return outcome.x_adv

    def attack_loss(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Per-example loss APGD ascends."""
        if self.loss == "ce":
            return self.objective(logits, y, target)
        if self.targeted:
            assert target is not None
            return dlr_to_target_loss(logits, target)
        return dlr_loss(logits, y)

    # -- restarts -----------------------------------------------------------------------------

    def _attack_with_restarts(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                              generator: torch.Generator, outcome: _Outcome) -> None:
        """Run up to ``restarts`` searches, each on the examples ``outcome`` has not yet fooled."""
        for _ in range(self.restarts):
            todo = (~outcome.found).nonzero().squeeze(1)
            if todo.numel() == 0:
                return
            run = self._search(model, x[todo], y[todo], None if target is None else target[todo],
                               generator)
            outcome.merge(todo, run)

    # -- one search ---------------------------------------------------------------------------

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> _Outcome:
        outcome = _Outcome.start(x)
        state = self._initial_state(model, x, y, target, generator, outcome)
        marks = checkpoints(self.n_iter)
        for k in range(self.n_iter):
            if self.early_stop:
                state = state.keep(~outcome.found[state.index])
                if state.index.numel() == 0:
                    break
            x_next = self._step(state, momentum=1.0 if k == 0 else MOMENTUM)
            # the last iterate only needs its loss and prediction: no step follows it
            logits, loss, grad = self._evaluate(model, x_next, state.y, state.target,
                                                need_grad=k < self.n_iter - 1)
            self._record_hits(outcome, state.index, state.y, state.target, x_next, logits)
            self._advance(state, x_next, loss, grad)
            if k + 1 in marks:  # x_{w_j} is the newest iterate
                self._checkpoint(state, window=marks[k + 1])
        standing = ~outcome.found[state.index]
        rows = state.index[standing]
        outcome.x_adv[rows] = state.x_best[standing]
        outcome.loss[rows] = state.loss_best[standing].double()
        return outcome

    def _initial_state(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                       generator: torch.Generator, outcome: _Outcome) -> _Search:
        x0 = self.threat.random_start(x, generator)
        n = x.shape[0]
        index = torch.arange(n, device=x.device)
        logits, loss, grad = self._evaluate(model, x0, y, target, need_grad=True)
        assert grad is not None
        self._record_hits(outcome, index, y, target, x0, logits)
        step = torch.full((n,), INITIAL_STEP * self.threat.eps, device=x.device, dtype=x0.dtype)
        return _Search(index=index, x_nat=x, y=y, target=target, x=x0, x_prev=x0, grad=grad, loss=loss,
                       step=step, x_best=x0, grad_best=grad, loss_best=loss, loss_best_at_check=loss,
                       halved_at_check=torch.zeros(n, dtype=torch.bool, device=x.device),
                       increases=torch.zeros(n, dtype=torch.long, device=x.device))

    def _evaluate(self, model: nn.Module, point: Tensor, y: Tensor, target: Tensor | None,
                  need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits, per-example loss and (if asked) its input gradient, from one pass."""
        def loss_of(logits: Tensor) -> Tensor:
            return self.attack_loss(logits, y, target)

        if not need_grad:
            with torch.no_grad():
                loss, logits = self.loss_and_logits(model, point, y, target, loss_of)
                return logits, loss, None
        point = point.detach().requires_grad_(True)
        if self.loss == "ce" and self.closed_form_applies(model):
            # the cross-entropy's gradient in the logits has a closed form; its value comes
            # from the same logits, so the loss APGD tracks is the one the graph would give
            grad, logits = self.gradient_and_logits(model, point, y, target)
            logits = logits.detach()
            return logits, loss_of(logits), grad
        loss, logits = self.loss_and_logits(model, point, y, target, loss_of)
        (grad,) = torch.autograd.grad(loss.sum(), point)
        return logits.detach(), loss.detach(), grad

    def _step(self, state: _Search, momentum: float) -> Tensor:
        direction = self.threat.ascent_direction(state.grad)
        z = self.threat.project(state.x + _expand(state.step, state.x) * direction, state.x_nat)
        if momentum == 1.0:
            return z
        moved = state.x + momentum * (z - state.x) + (1 - momentum) * (state.x - state.x_prev)
        return self.threat.project(moved, state.x_nat)

    def _record_hits(self, outcome: _Outcome, index: Tensor, y: Tensor, target: Tensor | None,
                     point: Tensor, logits: Tensor) -> None:
        """Store each example's first fooling point (in place)."""
        new = self.succeeded(logits, y, target) & ~outcome.found[index]
        outcome.x_adv[index[new]] = point[new].detach()
        outcome.found[index[new]] = True

    @staticmethod
    def _advance(state: _Search, x_next: Tensor, loss: Tensor, grad: Tensor | None) -> None:
        state.increases += (loss > state.loss).long()
        state.x_prev, state.x, state.loss = state.x, x_next, loss
        better = loss > state.loss_best
        state.x_best = torch.where(_expand(better, x_next), x_next, state.x_best)
        state.loss_best = torch.where(better, loss, state.loss_best)
        if grad is not None:
            state.grad = grad
            state.grad_best = torch.where(_expand(better, grad), grad, state.grad_best)

    def _checkpoint(self, state: _Search, window: int) -> None:
        """Halve the step, and go back to the best point, where progress stalled (conditions 1, 2)."""
        too_few_increases = state.increases < self.rho * window
        stalled = ~state.halved_at_check & (state.loss_best <= state.loss_best_at_check)
        halve = too_few_increases | stalled
        state.step = torch.where(halve, state.step / 2, state.step)
        wide = _expand(halve, state.x)
        state.x = torch.where(wide, state.x_best, state.x)
        state.grad = torch.where(wide, state.grad_best, state.grad)
        state.loss = torch.where(halve, state.loss_best, state.loss)
        state.halved_at_check = halve
        state.loss_best_at_check = state.loss_best.clone()
        state.increases.zero_()


class APGDTargeted(APGD):
    """APGD-T: targeted DLR towards each of the top ``n_target_classes`` non-true classes in turn."""

    name = "apgd-t"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_target_classes: int = 9,
        n_iter: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="dlr", n_iter=n_iter, restarts=restarts, rho=rho,
                         early_stop=early_stop, seed=seed)
        self.n_target_classes = check_positive_int("n_target_classes", n_target_classes)

    @property
    def label(self) -> str:
        suffix = f"x{self.restarts}" if self.restarts > 1 else ""
        return f"{self.name}-{self.n_iter}{suffix}"

    @property
    def earlier_labels(self) -> tuple[str, ...]:
        return (f"{self.name}{'x' + str(self.restarts) if self.restarts > 1 else ''}",)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "loss": "dlr-targeted", "n_target_classes": self.n_target_classes}

    def attack_loss(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        assert target is not None
        return dlr_targeted_loss(logits, y, target)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        # the clean logits choose the target classes; an example they misclassify is fooled at x
        with torch.no_grad():
            clean_logits = model(x)
        ranked = top_target_classes(clean_logits, y, self.n_target_classes)
        outcome = _Outcome.start(x)
        outcome.found = predicted_class(clean_logits) != y
        for rank in range(self.n_target_classes):
            self._attack_with_restarts(model, x, y, ranked[:, rank], generator, outcome)
        return outcome.x_adv


# Registered versions stop early: a fooled example's point is final, so the results are the same
ATTACKS.add("apgd-ce", partial(APGD, loss="ce", early_stop=True))
ATTACKS.add("apgd-dlr", partial(APGD, loss="dlr", early_stop=True))
ATTACKS.add("apgd-t", partial(APGDTargeted, early_stop=True))
