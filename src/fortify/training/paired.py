"""Objectives whose loss is a function of a clean batch and its adversarial twin.

TRADES, MART and PGD training all split into two parts: ``craft`` (an attack under the threat
model) and ``loss_on(model, x, y, x_adv)``. Keeping the parts apart lets wrappers reuse them: AWP
evaluates ``loss_on`` on a proxy copy of the model to find its weight perturbation, the clean/
adversarial mix adds a clean term, and tests check the loss on a fixed perturbation by hand.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks import PGD, Attack
from fortify.errors import ConfigError
from fortify.models.predictions import at_least_fp32
from fortify.threat import ThreatModel
from fortify.training.objectives import DelegatingObjective, _AttackObjective, scaled_step_size


def check_non_negative(name: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def kl_to_clean(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-example ``KL(p_clean || p_adv)`` from logits, in log space and fp32 at least, for stability.

    In bf16 (the logits under ``train.amp``) the two log-softmaxes round apart by more than the KL of
    nearby points, which then comes out as rounding noise, negative as often as not.
    """
    clean_logits, adv_logits = at_least_fp32(clean_logits), at_least_fp32(adv_logits)
    clean_probs = F.softmax(clean_logits, dim=1)
    log_ratio = F.log_softmax(clean_logits, dim=1) - F.log_softmax(adv_logits, dim=1)
    return (clean_probs * log_ratio).sum(dim=1)


class PairedObjective(_AttackObjective):
    """An adversarial objective split into ``craft`` and ``loss_on``.

    Label smoothing (``Objective.cross_entropy``) applies to every cross-entropy term of the loss;
    the attack always ascends the plain loss against the hard label.
    """

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_on(model, x, y, self.craft(model, x, y))

    def loss_on(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        """The training loss for a clean batch ``x`` and its adversarial points ``x_adv``."""
        raise NotImplementedError


class PGDPairedObjective(PairedObjective):
    """Madry et al. 2018 in paired form: cross-entropy on the final PGD iterate.

    The same training rule as the registered ``pgd`` objective, with the ``craft``/``loss_on``
    split that AWP and the clean/adversarial mix build on.
    """

    name = "pgd"

    def build_attack(self, threat: ThreatModel) -> Attack:
        return PGD(threat, steps=self.options.attack_steps,
                   step_size=scaled_step_size(self.options, threat), random_start=True,
                   keep_first_success=False)

    def loss_on(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        return self.cross_entropy(model(x_adv), y)


class ObjectiveWrapper(DelegatingObjective):
    """Base of objectives that wrap a paired one: randomness, eps and hooks go to the inner one."""

    adversarial = True
    inner: PairedObjective

    def __init__(self, inner: PairedObjective) -> None:
        super().__init__(inner)

    def craft(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.inner.craft(model, x, y)


def check_mix_ratio(ratio: float) -> float:
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ConfigError(f"mix ratio must be in [0, 1] (share of the adversarial loss), got {ratio!r}")
    return float(ratio)


class MixedObjective(ObjectiveWrapper):
    """``(1 - ratio) * CE(f(x), y) + ratio * inner.loss_on(x, x_adv)`` (Goodfellow et al. 2015).

    The ratio weighs the losses, as the ``fgsm`` objective's ``fgsm_ratio`` does: ratio 1 is the
    inner objective unchanged, ratio 0 is clean training (and skips the attack).
    """

    def __init__(self, inner: PairedObjective, ratio: float) -> None:
        super().__init__(inner)
        self.ratio = check_mix_ratio(ratio)
        self.name = f"{inner.name}-mix"
        self.adversarial = self.ratio > 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.ratio == 0.0:
            return self.cross_entropy(model(x), y)
        return self.loss_on(model, x, y, self.craft(model, x, y))

    def loss_on(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        adversarial = self.inner.loss_on(model, x, y, x_adv)
        if self.ratio == 1.0:
            return adversarial
        return (1 - self.ratio) * self.cross_entropy(model(x), y) + self.ratio * adversarial


def mixed(objective: PairedObjective, ratio: float) -> MixedObjective:
    """Mix clean and adversarial training of any paired objective with the given ratio."""
    return MixedObjective(objective, ratio)
