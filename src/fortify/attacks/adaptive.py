"""Adaptive attacks on masked gradients (Athalye, Carlini & Wagner, ICML 2018).

Both wrappers are models, not attacks: ``PGD(threat)(EOT(defended, 16), x, y)`` runs every gradient
attack unchanged against the wrapped model, and the points it returns are then scored on the
defended model itself.

- ``EOT`` (Expectation over Transformation) runs ``n_samples`` forward passes, each with fresh
  randomness. FGSM, PGD and APGD ascend the attack loss averaged over the samples, whose gradient is
  the Monte-Carlo estimate of the expected loss's gradient (Athalye et al. 2018; AutoAttack's and
  torchattacks' EOT average the loss gradients the same way), and judge each iterate by the mean
  logits. ``average="logits"`` ascends the loss of the mean logits instead (the expected logit's
  classifier). Any other attack, or a caller that just calls the model, sees the mean logits. The
  passes run one after another, not as one enlarged batch, because a defence may draw its
  randomness once per call (one resize for the batch) and the samples must be independent.
- ``BPDA`` (Backward Pass Differentiable Approximation) runs a non-differentiable input transform
  in the forward pass and replaces it by a differentiable approximation in the backward pass; the
  identity (straight-through) is the default and suits transforms with ``g(x) ~ x``, such as
  quantisation and JPEG.
- ``MarginPGD`` ascends the logit margin instead of the cross-entropy (Carlini & Wagner 2017), which
  stays informative where a saturated softmax makes the cross-entropy gradient underflow to zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.attacks.pgd import PGD
from fortify.errors import ConfigError

Transform = Callable[[Tensor], Tensor]


AVERAGES = ("loss", "logits")


class EOT(nn.Module):
    """``n_samples`` independent forward passes of a randomised ``model``: called, their mean logits;
    to the gradient attacks, their mean loss (``average="loss"``) or the loss of their mean logits."""

    def __init__(self, model: nn.Module, n_samples: int, average: str = "loss") -> None:
        super().__init__()
        if average not in AVERAGES:
            raise ConfigError(f"unknown EOT average {average!r}; valid: {', '.join(AVERAGES)}")
        self.model = model
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.average = average

    def forward(self, x: Tensor) -> Tensor:
        total = self.model(x)
        for _ in range(self.n_samples - 1):
            total = total + self.model(x)
        return total / self.n_samples

    def average_objective(self, x: Tensor, loss: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Per-example ``loss`` over the samples and the mean logits (``Attack.loss_and_logits``)."""
        if self.average == "logits":
            logits = self(x)
            return loss(logits), logits
        logits = self.model(x)
        total = loss(logits)
        for _ in range(self.n_samples - 1):
            sample = self.model(x)
            total, logits = total + loss(sample), logits + sample
        return total / self.n_samples, logits / self.n_samples

    def extra_repr(self) -> str:
        return f"n_samples={self.n_samples}, average={self.average!r}"


class _BackwardApproximation(torch.autograd.Function):
    """Forward: ``transform(x)``. Backward: the vector-Jacobian product of ``approximation``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, transform: Transform, approximation: Transform | None) -> Tensor:
        ctx.approximation = approximation
        ctx.save_for_backward(x)
        with torch.no_grad():
            return transform(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        if ctx.approximation is None:
            return grad_output, None, None  # straight-through: the identity's Jacobian
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            point = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.approximation(point), point, grad_output)
        return grad, None, None


class BPDA(nn.Module):
    """``model(transform(x))`` whose backward pass differentiates ``approximation`` instead.

    ``approximation=None`` means the identity, which needs ``transform`` to keep the input's shape.
    ``BPDA.around(defence)`` builds it for an ``InputTransformDefence``.
    """

    def __init__(self, model: nn.Module, transform: Transform,
                 approximation: Transform | None = None) -> None:
        super().__init__()
        self.model = model
        self.transform = transform
        self.approximation = approximation
        owner = getattr(transform, "__self__", None)
        if isinstance(owner, nn.Module):  # a defence's own method: its buffers (JPEG's tables) move too
            self.transform_owner = owner

    @classmethod
    def around(cls, defence: nn.Module, approximation: Transform | None = None) -> BPDA:
        """BPDA for a defence that exposes ``model`` and ``transform`` (an InputTransformDefence)."""
        missing = [name for name in ("model", "transform") if not hasattr(defence, name)]
        if missing:
            raise ConfigError(f"BPDA.around needs a defence with an input transform (model and "
                              f"transform, as every InputTransformDefence has); {type(defence).__name__} "
                              f"has no {' or '.join(missing)}: wrap its model with BPDA(model, transform)")
        return cls(defence.model, defence.transform, approximation)

    def forward(self, x: Tensor) -> Tensor:
        transformed = _BackwardApproximation.apply(x, self.transform, self.approximation)
        if self.approximation is None and transformed.shape != x.shape:
            raise ConfigError(f"BPDA's identity approximation needs a transform that keeps the input's "
                              f"shape; it turned {tuple(x.shape)} into {tuple(transformed.shape)}: pass an "
                              "approximation of the same shape change")
        return self.model(transformed)


class MarginPGD(PGD):
    """PGD on the margin ``max_{j != y} z_j - z_y`` (towards the target: ``z_t - max_{j != t} z_j``)."""

    name = "pgd-margin"

    def objective(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.targeted:  # ascend the target's lead over every other class
            assert target is not None
            return logit_margin(logits, target)
        return -logit_margin(logits, y)


def logit_margin(logits: Tensor, label: Tensor) -> Tensor:
    """Per example ``z_label - max_{j != label} z_j``: positive where ``label`` is predicted."""
    own = logits.gather(1, label.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, label.unsqueeze(1), -torch.inf)
    return own - others.amax(dim=1)
