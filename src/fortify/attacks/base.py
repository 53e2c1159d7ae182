"""What every attack shares: the call contract, mode handling, input checks and seeding.

An attack is ``attack(model, x, y) -> x_adv``. The base class validates the batch, puts the model
in eval mode for the duration and restores the caller's mode afterwards, and gives subclasses a
seeded ``torch.Generator`` so that two calls with the same seed return the same points.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.errors import ConfigError, DataError
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import (
    at_least_fp32,
    fooled_beyond_rounding,
    predicted_class,
    reached_beyond_rounding,
)
from fortify.registry import Registry
from fortify.threat import LOW_PRECISION, ThreatModel

ATTACKS: Registry = Registry("attack")


class Attack(ABC):
    """Base class: subclasses implement ``perturb`` and declare ``supported_norms``."""

    name: ClassVar[str] = "attack"
    supported_norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    # whether the attack moves only through the threat model's own steps and projection, and so
    # keeps a feature schema's constraints (fortify.tabular); the minimal-norm and decision-based
    # attacks search the plain ball and do not
    keeps_feature_schema: ClassVar[bool] = True

    def __init__(self, threat: ThreatModel, *, targeted: bool = False, seed: int = 0) -> None:
        if threat.norm not in self.supported_norms:
            raise ConfigError(
                f"attack {self.name!r} does not support norm {threat.norm!r}; "
                f"supported: {', '.join(self.supported_norms)}"
            )
        self._check_schema(threat)
        self.threat = threat
        self.targeted = targeted
        self.seed = check_seed("seed", seed)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self._check_batch(x, y, target)
        return self.run(model, x, y, target=target, generator=generator)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The attack without ``__call__``'s checks of the batch (finite, in the box, integer labels),
        for a caller that checked its data once beforehand, as the Trainer does its training set:
        those checks read values back from the device, a host sync per batch on a GPU."""
        y, target = y.long(), None if target is None else target.long()
        with attacking(model):
            self._check_target_classes(model, x, target)
            try:
                x_adv = self.perturb(model, x.detach(), y, target, self.seeded(x, generator))
            except (IndexError, RuntimeError) as err:
                diagnose_failure(model, x, y, err)
                raise
        if x.dtype in LOW_PRECISION:
            # an attack that searched in float32 (C&W, FMN, FAB, HSJ) cast its answer to nearest, which can
            # step half a unit in the last place outside; projecting is a no-op for a point inside
            x_adv = self.threat.project(x_adv, x)
        return x_adv.detach()

    def seeded(self, x: Tensor, generator: torch.Generator | None) -> torch.Generator:
        """The caller's generator, or a fresh one on ``x``'s device seeded with ``self.seed``."""
        if generator is not None:
            return generator
        return torch.Generator(device=x.device).manual_seed(self.seed)

    @abstractmethod
    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator,
    ) -> Tensor:
        """Return adversarial points for ``x`` inside ``self.threat``."""

    def with_threat(self, threat: ThreatModel) -> Attack:
        """A copy of this attack under another eps or box (e.g. for an eps sweep); the norm stays,
        since norm-dependent defaults (step rules, supported norms) were settled when it was built."""
        if threat.norm != self.threat.norm:
            raise ConfigError(f"{self.name} was built for {self.threat.norm}; build a new attack for "
                              f"{threat.norm} instead of re-targeting it")
        self._check_schema(threat)
        clone = copy.copy(self)
        clone.threat = threat
        return clone

    def _check_schema(self, threat: ThreatModel) -> None:
        """Refuse a feature schema this attack would not keep: its points would move immutable
        features, so every one of them would be refused and the model would look robust."""
        if threat.constrained and not self.keeps_feature_schema:
            keeping = [name for name in ATTACKS.names() if _keeps_feature_schema(ATTACKS.get(name))]
            raise ConfigError(f"attack {self.name!r} searches the plain {threat.norm} ball and cannot keep "
                              f"a feature schema's constraints; under a schema use: {', '.join(keeping)}")

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``pgd-20``."""
        return self.name

    @property
    def earlier_labels(self) -> tuple[str, ...]:
        """Labels that earlier versions of fortify gave this attack, under which an evaluation
        journal they wrote still records its finished results."""
        return ()

    def describe(self) -> dict[str, object]:
        """Settings that must accompany any number this attack produced."""
        return {"attack": self.name, "norm": self.threat.norm, "eps": self.threat.eps,
                "targeted": self.targeted, "seed": self.seed}

    # -- shared helpers -----------------------------------------------------------------------

    def _check_batch(self, x: Tensor, y: Tensor, target: Tensor | None) -> None:
        self.threat.check_inputs(x)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        check_label_dtype(y)
        if y.numel() and int(y.min()) < 0:  # the upper end needs the model (diagnose_failure)
            raise DataError(f"labels must be class indices 0..K-1, got {int(y.min())}")
        if self.targeted and target is None:
            raise ConfigError(f"attack {self.name!r} is targeted: pass target=<labels>")
        if target is not None and not self.targeted:
            advice = ("build it with targeted=True" if "targeted" in inspect.signature(type(self)).parameters
                      else "it has no targeted form")
            raise ConfigError(f"attack {self.name!r} is untargeted and would ignore target=; {advice}")
        if target is not None and target.shape != y.shape:
            raise DataError(f"target must have shape {tuple(y.shape)}, got {tuple(target.shape)}")
        if target is not None:
            check_label_dtype(target, "target labels")

    def _check_target_classes(self, model: nn.Module, x: Tensor, target: Tensor | None) -> None:
        """A target must name one of the model's classes; learning how many costs one forward pass
        of one example, spent only when targets are given."""
        if target is None or not target.numel():
            return
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        check_label_range(target, num_classes, what="target labels")

    def objective(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Per-example loss the attack ascends: CE away from y, or towards the target."""
        if self.targeted:
            assert target is not None
            return -F.cross_entropy(logits, target, reduction="none")
        return F.cross_entropy(logits, y, reduction="none")

    def loss_and_logits(self, model: nn.Module, point: Tensor, y: Tensor, target: Tensor | None,
                        loss: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Per-example ``loss`` (default: ``objective``) at ``point`` and the logits that judge it.

        A randomised model that averages its samples by their loss (``EOT``, which exposes
        ``average_objective``) returns the loss averaged over the samples, whose gradient is the
        mean of theirs (Athalye et al. 2018), and the mean logits; any other model runs once.
        """
        per_example = loss or (lambda logits: self.objective(logits, y, target))
        average = getattr(model, "average_objective", None)
        if average is not None:
            return average(point, per_example)
        logits = model(point)
        return per_example(logits), logits

    def closed_form_applies(self, model: nn.Module) -> bool:
        """Whether ``gradient_and_logits`` may step on the cross-entropy's closed-form logit gradient:
        the attack keeps the cross-entropy ``objective`` and the model runs once per pass."""
        return type(self).objective is Attack.objective and not hasattr(model, "average_objective")

    def gradient_and_logits(self, model: nn.Module, point: Tensor, y: Tensor,
                            target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gradient of the summed ``objective`` in ``point`` (which requires grad), and the logits.

        For the cross-entropy objective on a model that runs once, the gradient in the logits ``z``
        has the closed form ``softmax(z) - onehot(y)`` (towards a target: ``onehot(t) - softmax(z)``).
        Handed to autograd as the model's output gradient, it spares the backward pass through the
        loss's log-softmax, gather and sum; the input gradient is the same to rounding. Any other
        objective, and a model that averages samples (``EOT``), goes through the loss.
        """
        if not self.closed_form_applies(model):
            loss, logits = self.loss_and_logits(model, point, y, target)
            (grad,) = torch.autograd.grad(loss.sum(), point)
            return grad, logits
        logits = model(point)
        ascent = cross_entropy_logit_gradient(logits.detach(), target if self.targeted else y)
        if self.targeted:  # descend the cross-entropy to the target
            ascent = -ascent
        (grad,) = torch.autograd.grad(logits, point, grad_outputs=ascent.to(logits.dtype))
        return grad, logits

    def succeeded(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Per-example boolean: the prediction is wrong (or equals the target)."""
        pred = predicted_class(logits)
        if self.targeted:
            assert target is not None
            return pred == target
        return pred != y

    def succeeded_beyond_rounding(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """``succeeded`` by more than float rounding (``fortify.models.predictions.rounding_margin``):
        what a minimal-norm search records, so that the point it returns as adversarial is judged so
        in a batch of any size."""
        if self.targeted:
            assert target is not None
            return reached_beyond_rounding(logits, target)
        return fooled_beyond_rounding(logits, y)


@contextlib.contextmanager
def attacking(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients on for the duration; the caller's mode comes back afterwards."""
    with evaluation_mode(model), torch.enable_grad():
        yield


def cross_entropy_logit_gradient(logits: Tensor, label: Tensor) -> Tensor:
    """``d/dz sum_i CE(z_i, label_i) = softmax(z) - onehot(label)``, in fp32 at least (as the loss
    itself is computed under mixed precision).

    The label's entry ``p_label - 1`` is taken as minus the sum of the other classes' probabilities,
    which it equals: for a confident row ``p_label`` rounds to 1 and ``p_label - 1`` to 0 while the
    others are still ~1e-23, and the gradient then lost the label's weights and pointed elsewhere.
    """
    gradient = F.softmax(at_least_fp32(logits), dim=1)
    rows = torch.arange(label.shape[0], device=label.device)
    gradient[rows, label] = 0.0
    gradient[rows, label] = -gradient.sum(dim=1)
    return gradient


def _keeps_feature_schema(factory: object) -> bool:
    """A registered attack's ``keeps_feature_schema``; its factory is a class or a partial of one."""
    return bool(getattr(getattr(factory, "func", factory), "keeps_feature_schema", True))


def check_label_dtype(y: Tensor, what: str = "labels") -> None:
    """Raise DataError unless ``y`` holds integer class indices."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{what} must be integer class indices, got dtype {y.dtype}")


def as_class_indices(y: Tensor, what: str = "labels") -> Tensor:
    """``y`` as int64 class indices, the dtype torch's losses and gathers take (int32 or uint8
    labels fail inside them); DataError unless it holds integers."""
    check_label_dtype(y, what)
    return y.long()


def diagnose_failure(model: nn.Module, x: Tensor, y: Tensor, err: Exception) -> None:
    """After an attack failed inside torch, raise DataError naming the caller's mistake when it is
    one (inputs the model cannot take, an output that is not logits, a label past the model's
    classes); otherwise return and let the original error stand. Costs one forward pass of one
    example, spent only on failure."""
    try:
        with torch.no_grad():
            logits = model(x[:1])
    except (RuntimeError, TypeError, ValueError) as probe_error:
        raise DataError(f"the model does not run on these inputs (dtype {x.dtype}, shape "
                        f"{tuple(x.shape[1:])} per example): {probe_error}") from err
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise DataError(f"the model must return logits of shape (N, classes); it returned {shape}") from err
    check_label_range(y, logits.shape[1])


def check_label_range(y: Tensor, num_classes: int, what: str = "labels") -> None:
    """Raise DataError when a label is outside ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{what} range over [{int(y.min())}, {int(y.max())}] but the model has "
            f"{num_classes} classes (allowed: 0..{num_classes - 1})"
        )


def top_target_classes(logits: Tensor, y: Tensor, k: int) -> Tensor:
    """Per example, the ``k`` non-true classes with the highest logits, best first (N, k).

    The target choice of APGD-T and FAB-T (Croce & Hein 2020).
    """
    num_classes = logits.shape[1]
    if k >= num_classes:
        raise ConfigError(f"n_target_classes={k} is out of range for a model with {num_classes} "
                          f"classes; allowed: 1..{num_classes - 1}")
    return logits.scatter(1, y[:, None], -torch.inf).topk(k, dim=1).indices


def check_seed(name: str, value: int) -> int:
    """``value`` as an int that ``torch.Generator.manual_seed`` takes (4.0 counts as 4), else a
    ConfigError: a fraction was truncated in silence, and a seed past 64 bits failed inside torch."""
    is_seed = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
               and int(value) == value and -(2**63) <= value < 2**64)
    if not is_seed:
        raise ConfigError(f"{name} must be an integer in [-2**63, 2**64), got {value!r}")
    return int(value)


def check_positive_int(name: str, value: int) -> int:
    """``value`` as an int >= 1 (4.0 counts as 4), else a ConfigError; flags, text, NaN and inf
    are no counts."""
    is_count = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
                and int(value) == value and value >= 1)
    if not is_count:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
