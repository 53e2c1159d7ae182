"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

The loss is ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``: the first term fits the clean data, the
second makes the prediction flat inside the ball. ``x_adv`` maximises the KL term, found by PGD
from ``x + 0.001 * N(0, 1)`` (the KL and its gradient are exactly zero at ``x`` itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks import Attack
from fortify.attacks.base import attacking, check_positive_int
from fortify.errors import ConfigError
from fortify.models.modes import runs_alike_in_both_modes
from fortify.models.predictions import at_least_fp32
from fortify.threat import LOW_PRECISION, ThreatModel
from fortify.training.objectives import ObjectiveOptions, scaled_step_size
from fortify.training.paired import PairedObjective, check_non_negative, kl_to_clean


class KLAttack(Attack):
    """PGD on ``KL(p(x) || p(x_adv))``: moves the prediction away from the clean one, label-free.

    The clean distribution is computed once, in eval mode, and held fixed during the ascent (as in
    the authors' code). ``step_size`` defaults to PGD's ``2.5 * eps / steps``; the paper's
    CIFAR-10 setting (eps 0.031, step 0.007, 10 steps) is close to it.
    """

    name = "kl-pgd"

    def __init__(self, threat: ThreatModel, *, steps: int = 10, step_size: float | None = None,
                 init_std: float = 0.001, seed: int = 0) -> None:
        super().__init__(threat, seed=seed)
        self.steps = check_positive_int("steps", steps)
        self.step_size = 2.5 * threat.eps / self.steps if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise ConfigError(f"step_size must be > 0, got {step_size!r}")
        self.init_std = check_non_negative("init_std", init_std)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.steps}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size,
                "init_std": self.init_std}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            clean_logits = model(x)
        return self.ascend(model, x, clean_logits, generator)

    def ascend(self, model: nn.Module, x: Tensor, clean_logits: Tensor,
               generator: torch.Generator) -> Tensor:
        """The ascent from ``x`` away from the distribution of ``clean_logits`` (the model's at ``x``,
        in eval mode); the caller runs it under ``attacking(model)``, as ``run`` does ``perturb``."""
        clean_probs = F.softmax(at_least_fp32(clean_logits.detach()), dim=1)
        x_adv = self.threat.project(x + self._start_noise(x, generator), x)
        for _ in range(self.steps):
            point = x_adv.requires_grad_(True)
            logits = model(point)
            # The gradient of sum KL(p || softmax(z)) in the logits z is softmax(z) - p: handed to
            # autograd as it is, it spares the backward pass through the loss's log-softmaxes.
            ascent = F.softmax(at_least_fp32(logits.detach()), dim=1) - clean_probs
            (grad,) = torch.autograd.grad(logits, point, grad_outputs=ascent.to(logits.dtype))
            stepped = point.detach() + self.step_size * self.threat.ascent_direction(grad)
            x_adv = self.threat.project(stepped, x)
        return x_adv

    def _start_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=work)
        return (self.init_std * noise).to(device=x.device, dtype=x.dtype)


class TradesObjective(PairedObjective):
    """TRADES with ``beta = 6.0`` by default, the paper's choice for CIFAR-10 (1/lambda = 6)."""

    name = "trades"

    def __init__(self, options: ObjectiveOptions, *, beta: float = 6.0,
                 label_smoothing: float | None = None) -> None:
        self.beta = check_non_negative("trades beta", beta)
        super().__init__(options, label_smoothing=label_smoothing)

    def build_attack(self, threat: ThreatModel) -> Attack:
        return KLAttack(threat, steps=self.options.attack_steps,
                        step_size=scaled_step_size(self.options, threat))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if not runs_alike_in_both_modes(model):
            return super().__call__(model, x, y)
        # The attack's clean distribution (eval mode) and the loss's clean logits (training mode)
        # are the same numbers for such a model: one pass serves both, one forward pass fewer per batch.
        clean_logits = model(x)
        with attacking(model):
            x_adv = self.attack.ascend(model, x.detach(), clean_logits, self.generator(x.device))
        return self._loss(clean_logits, y, model(x_adv))

    def loss_on(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        # two forward passes, as in the paper: concatenating would mix BatchNorm statistics
        clean_logits = model(x)
        return self._loss(clean_logits, y, model(x_adv))

    def _loss(self, clean_logits: Tensor, y: Tensor, adv_logits: Tensor) -> Tensor:
        return self.cross_entropy(clean_logits, y) + self.beta * kl_to_clean(clean_logits, adv_logits).mean()

