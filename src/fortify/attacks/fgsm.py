"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack
from fortify.errors import ConfigError
from fortify.threat import ThreatModel


class FGSM(Attack):
    """One step along the steepest-ascent direction, optionally from a random start.

    ``step_size`` defaults to eps. With ``random_start=True`` and ``step_size=1.25*eps`` this is
    the step used by fast adversarial training (Wong et al. 2020).
    """

    name = "fgsm"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        step_size: float | None = None,
        random_start: bool = False,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.step_size = threat.eps if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise ConfigError(f"step_size must be > 0, got {step_size!r}")
        self.random_start = random_start

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        start = self.threat.random_start(x, generator) if self.random_start else x.clone()
        start.requires_grad_(True)
        grad = self.gradient_and_logits(model, start, y, target)[0]
        return self.step(start.detach(), grad, x)

    def step(self, start: Tensor, grad: Tensor, x: Tensor) -> Tensor:
        """The point one step from ``start`` along ``grad`` (the objective's gradient there), projected
        into the threat model around the clean ``x``."""
        stepped = start + self.step_size * self.threat.ascent_direction(grad)
        return self.threat.project(stepped, x)

    def with_threat(self, threat: ThreatModel) -> FGSM:
        clone = super().with_threat(threat)
        assert isinstance(clone, FGSM)
        clone.step_size = self.step_size * threat.eps / self.threat.eps  # the same step relative to eps
        return clone

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "step_size": self.step_size,
                "random_start": self.random_start}


ATTACKS.add("fgsm", FGSM)
