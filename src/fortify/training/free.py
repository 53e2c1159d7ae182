"""Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!").

Each minibatch is replayed ``m`` times. One backward pass gives both the weight gradient (for the
optimiser step) and the input gradient (for the next perturbation), so the attack costs nothing
extra. The perturbation ``delta`` is carried across replays and across batches: a new batch
starts from the perturbation the previous one ended with.

As in the paper's Algorithm 1, ``delta`` lives in the eps ball alone:
``delta <- clip(delta + step * sign(g), -eps, eps)`` (for L2 the sum is scaled back onto the ball),
and only the model's input ``x + delta`` is clipped to the box. ``g`` is the input gradient of the
training loss, label smoothing included, since it comes from that loss's backward pass, taken at
the clipped input. The authors' code differentiates through the box clip instead, so where
``x + delta`` lies outside the box its ``g`` is 0 and ``delta`` stays put there; here it moves by
the gradient at the clipped point. Inside the box the two agree.

Compute: every batch costs ``m`` forward/backward passes, so ``epochs / m`` epochs of Free AT cost
about as much as ``epochs`` epochs of standard training. Divide the epoch count by ``m`` when
comparing with other objectives at equal compute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.errors import ConfigError
from fortify.threat import ThreatModel
from fortify.training.objectives import Objective, ObjectiveOptions


class FreeObjective(Objective):
    """Free AT with ``m = 8`` replays by default (the paper's CIFAR-10 choice) and step size eps.

    ``attack_step_size`` in the options overrides the step (the paper ascends by eps). The Trainer
    calls the objective ``replays`` times per batch; ``after_backward`` reads the input gradient of
    that same backward pass and moves ``delta`` by one projected ascent step. An epoch's training
    loss is the mean over every replay, as the reference code logs it.
    """

    name = "free"
    adversarial = True

    def __init__(self, options: ObjectiveOptions, *, replays: int = 8,
                 label_smoothing: float | None = None) -> None:
        super().__init__(options, label_smoothing=label_smoothing)
        self.replays = check_positive_int("free replays", replays)
        self.threat = options.threat
        self.delta: Tensor | None = None
        self._point: Tensor | None = None

    def set_eps(self, eps: float) -> None:
        if eps != self.threat.eps:
            self.threat = self.options.threat.with_eps(eps)

    @property
    def step_size(self) -> float:
        configured = self.options.attack_step_size
        if configured is None:
            return self.threat.eps
        return configured * self.threat.eps / self.options.threat.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        delta = self._delta_for(x)
        # the model's input: x + delta clipped to the box (delta already lies in the ball)
        point = self.threat.project(x + delta, x).detach().requires_grad_(True)
        self._point = point
        return self.cross_entropy(model(point), y)

    def after_backward(self, model: nn.Module) -> None:
        point = self._point
        if point is None:
            raise ConfigError("free: after_backward was called without a preceding objective call")
        if point.grad is None:
            raise ConfigError("free: the loss did not reach the inputs; call loss.backward() first")
        assert self.delta is not None
        rows = self.delta[: point.shape[0]]
        stepped = rows + self.step_size * self.threat.ascent_direction(point.grad)
        rows.copy_(perturbation_in_ball(self.threat, stepped))
        self._point = None  # release the batch and its graph

    def _delta_for(self, x: Tensor) -> Tensor:
        """The carried perturbation for a batch like ``x``: reset on a new shape, grown with zeros."""
        n = x.shape[0]
        delta = self.delta
        if (delta is None or delta.shape[1:] != x.shape[1:] or delta.device != x.device
                or delta.dtype != x.dtype):
            delta = torch.zeros_like(x)
        elif delta.shape[0] < n:
            # a larger batch than any before: new rows start unperturbed, as the paper's delta does
            delta = torch.cat([delta, torch.zeros_like(x[: n - delta.shape[0]])])
        self.delta = delta
        return delta[:n]

    # -- state a checkpoint needs for an exact resume ------------------------------------------

    def extra_state(self) -> dict[str, Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().clone()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else delta.clone()

    def reset_carried_state(self) -> None:
        """Start the next batch unperturbed, as the first one did."""
        self.delta = None


def ball_about_zero(threat: ThreatModel) -> ThreatModel:
    """``threat``'s eps ball about 0 in a box that holds the whole ball, for projecting a perturbation
    rather than a point: the box clip after the ball projection moves nothing."""
    return ThreatModel(threat.norm, threat.eps, bounds=(-threat.eps, threat.eps))


def perturbation_in_ball(threat: ThreatModel, delta: Tensor) -> Tensor:
    """``delta`` projected onto ``threat``'s eps ball about 0. Under a feature schema the ball is
    weighted (``ThreatModel.coordinate_costs``): a feature may move eps / cost, an immutable one not
    at all; the schema's directions, bounds and types then hold for the model's input ``x + delta``,
    which the threat model projects."""
    costs = threat.coordinate_costs(delta)
    ball = ball_about_zero(threat)
    if costs is None:
        return ball.project(delta, torch.zeros_like(delta))
    budget = ball.project(delta * costs, torch.zeros_like(delta))  # the plain ball, in budget units
    return torch.where(costs > 0, budget / costs.clamp_min(torch.finfo(costs.dtype).tiny), 0.0)
