"""Training objectives: ``objective(model, x, y) -> loss``.

An adversarial objective crafts its examples with an Attack under its ThreatModel. It owns a
generator for the attack's random starts, kept across batches and saved in checkpoints, so a
resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks import FGSM, PGD, Attack
from fortify.attacks.base import cross_entropy_logit_gradient
from fortify.errors import ConfigError
from fortify.models.modes import runs_alike_in_both_modes
from fortify.models.predictions import at_least_fp32
from fortify.registry import Registry
from fortify.threat import ThreatModel


@dataclass(frozen=True)
class ObjectiveOptions:
    """Settings an objective factory may read; each objective uses the ones it needs."""

    threat: ThreatModel
    attack_steps: int = 10
    attack_step_size: float | None = None
    fgsm_ratio: float = 0.5
    seed: int = 0
    label_smoothing: float = 0.0


def check_label_smoothing(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ConfigError(f"label_smoothing must be in [0, 1), got {value!r}")
    return float(value)


def scaled_step_size(options: ObjectiveOptions, threat: ThreatModel) -> float | None:
    """The configured attack step, kept at the same share of eps while eps warms up."""
    step = options.attack_step_size
    if step is not None and threat.eps != options.threat.eps:
        step *= threat.eps / options.threat.eps
    return step


class Objective:
    """Clean cross-entropy; subclasses replace the inputs with adversarial ones.

    ``label_smoothing`` (Szegedy et al. 2016; from the options unless given) applies to every
    cross-entropy term of the training loss, through ``cross_entropy``; the attacks that craft the
    inputs ascend the plain cross-entropy against the hard label. Smoothing 0 is plain cross-entropy.

    Every loss head works on logits of fp32 or wider (``at_least_fp32``), whatever precision the
    model ran in: under mixed precision (``train.amp``) the model's logits are bf16, and bf16 keeps 8
    bits of mantissa, too few for a probability near 1 or a KL of close distributions. The cast is
    what autocast does itself for the ops it runs in fp32; the gradient flows back through it to the
    bf16 graph.

    The Trainer calls ``objective(model, x, y)`` ``replays`` times per batch (Free AT replays a
    batch), each call followed by ``loss.backward()``, ``after_backward(model)`` (where an
    objective may read input gradients or restore perturbed weights) and one optimiser step.
    """

    name = "standard"
    adversarial = False
    replays = 1

    def __init__(self, options: ObjectiveOptions, *, label_smoothing: float | None = None) -> None:
        self.options = options
        smoothing = options.label_smoothing if label_smoothing is None else label_smoothing
        self.label_smoothing = check_label_smoothing(smoothing)
        self._generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.cross_entropy(model(x), y)

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss's cross-entropy, with this objective's label smoothing, in fp32 at least."""
        return F.cross_entropy(at_least_fp32(logits), y, label_smoothing=self.label_smoothing)

    def after_backward(self, model: nn.Module) -> None:
        """Called after each backward pass, before gradient clipping and the optimiser step."""

    # -- eps warm-up and reproducible randomness ----------------------------------------------

    def set_eps(self, eps: float) -> None:
        """Change the training eps (used by eps warm-up); no-op for clean training."""

    def set_progress(self, epochs_done: float) -> None:
        """Epochs of training done so far (fractional); called before every step. An objective with
        a schedule of its own (AWP's warm-up) reads it; the rest ignore it."""

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.options.seed)
        return self._generator

    def rng_state(self) -> Tensor | None:
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: Tensor, device: torch.device) -> None:
        self.generator(device).set_state(state)


class DelegatingObjective(Objective):
    """Base of objectives that wrap another: eps, randomness and hooks go to the wrapped one.

    The wrapped objective keeps the only generator, so checkpoints and resume see one state.
    """

    def __init__(self, inner: Objective) -> None:
        super().__init__(inner.options, label_smoothing=inner.label_smoothing)
        self.inner = inner

    def after_backward(self, model: nn.Module) -> None:
        self.inner.after_backward(model)

    def set_eps(self, eps: float) -> None:
        self.inner.set_eps(eps)

    def set_progress(self, epochs_done: float) -> None:
        self.inner.set_progress(epochs_done)

    def generator(self, device: torch.device) -> torch.Generator:
        return self.inner.generator(device)

    def rng_state(self) -> Tensor | None:
        return self.inner.rng_state()

    def set_rng_state(self, state: Tensor, device: torch.device) -> None:
        self.inner.set_rng_state(state, device)


class _AttackObjective(Objective):
    """Objectives that craft with one attack; eps warm-up swaps the attack's threat model."""

    adversarial = True

    def __init__(self, options: ObjectiveOptions, *, label_smoothing: float | None = None) -> None:
        super().__init__(options, label_smoothing=label_smoothing)
        self.attack = self.build_attack(options.threat)

    def build_attack(self, threat: ThreatModel) -> Attack:
        raise NotImplementedError

    def set_eps(self, eps: float) -> None:
        if eps != self.attack.threat.eps:
            self.attack = self.build_attack(self.options.threat.with_eps(eps))

    def craft(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial points for a training batch; the batch is not checked here (no host sync per
        step): the Trainer checked the whole training set once (``check_training_data``)."""
        return self.attack.run(model, x, y, generator=self.generator(x.device))


class FGSMObjective(_AttackObjective):
    """Goodfellow et al. 2015: ``(1 - ratio) * CE(clean) + ratio * CE(FGSM)``."""

    name = "fgsm"

    def __init__(self, options: ObjectiveOptions, *, label_smoothing: float | None = None) -> None:
        super().__init__(options, label_smoothing=label_smoothing)
        if not (math.isfinite(options.fgsm_ratio) and 0.0 <= options.fgsm_ratio <= 1.0):
            raise ConfigError(f"fgsm_ratio must be in [0, 1] (share of the FGSM loss), "
                              f"got {options.fgsm_ratio!r}")
        self.ratio = float(options.fgsm_ratio)
        # ratio 0 trains on clean data alone: validate and select on clean accuracy, as pgd-mix does
        self.adversarial = self.ratio > 0

    def build_attack(self, threat: ThreatModel) -> Attack:
        return FGSM(threat)  # steps eps: attack_step_size does not apply (docs/RECIPES.md)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        ratio = self.ratio
        if ratio == 0.0:  # clean training: the FGSM points would carry no weight
            return self.cross_entropy(model(x), y)
        if ratio == 1.0:
            return self.cross_entropy(model(self.craft(model, x, y)), y)
        if runs_alike_in_both_modes(model):
            clean_logits, x_adv = self._clean_pass_and_fgsm(model, x, y)
        else:
            # a pass of its own for each half, as in pgd-mix, TRADES and MART: one pass over both
            # halves would normalise each with BatchNorm statistics of the clean and adversarial mix
            x_adv = self.craft(model, x, y)
            clean_logits = model(x)
        return (1 - ratio) * self.cross_entropy(clean_logits, y) + ratio * self.cross_entropy(model(x_adv), y)

    def _clean_pass_and_fgsm(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The clean term's logits and the FGSM points from one forward pass at ``x``: for a model that
        computes the same function in either mode, the attack's pass (eval mode) and the loss's
        (training mode) give the same numbers. The graph is kept for the loss's backward pass."""
        fgsm = self.attack
        assert isinstance(fgsm, FGSM)
        point = x.detach().requires_grad_(True)
        logits = model(point)
        ascent = cross_entropy_logit_gradient(logits.detach(), y.long())  # as the attack steps
        (grad,) = torch.autograd.grad(logits, point, grad_outputs=ascent.to(logits.dtype), retain_graph=True)
        return logits, fgsm.step(point.detach(), grad, x.detach())


class FastFGSMObjective(_AttackObjective):
    """Wong et al. 2020: FGSM from a uniform random start with step 1.25 * eps."""

    name = "fgsm-rs"

    def build_attack(self, threat: ThreatModel) -> Attack:
        step = scaled_step_size(self.options, threat) or 1.25 * threat.eps
        return FGSM(threat, step_size=step, random_start=True)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.cross_entropy(model(self.craft(model, x, y)), y)


class PGDObjective(_AttackObjective):
    """Madry et al. 2018: cross-entropy on the final PGD iterate from a random start."""

    name = "pgd"

    def build_attack(self, threat: ThreatModel) -> Attack:
        return PGD(threat, steps=self.options.attack_steps,
                   step_size=scaled_step_size(self.options, threat), random_start=True,
                   keep_first_success=False)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.cross_entropy(model(self.craft(model, x, y)), y)


OBJECTIVES: Registry[Callable[[ObjectiveOptions], Objective]] = Registry("objective")
for _cls in (Objective, FGSMObjective, FastFGSMObjective, PGDObjective):
    OBJECTIVES.add(_cls.name, _cls)


def build_objective(name: str, options: ObjectiveOptions) -> Objective:
    return OBJECTIVES.get(name)(options)

from fortify.evaluation import certify as _certify  # noqa: E402,F401,I001  (registers gaussian)
# registers trades, mart, free, awp-pgd, awp-trades and pgd-mix (see fortify.training.methods)
from fortify.training import methods as _methods  # noqa: E402,F401
