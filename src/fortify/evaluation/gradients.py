"""The input-gradient check of an evaluation: gradient attacks need a gradient to follow.

A model whose input gradient is zero (it detaches its input, rounds it, outputs a one-hot argmax)
or not finite (NaN, Inf) stops every gradient attack at its starting point, and the evaluation would
report near-100% robust accuracy for a model that is not robust at all. One backward pass of the
cross-entropy on the examples the attacks see first tells the two cases apart; the report then
carries a warning instead of a silent number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks.base import Attack
from fortify.attacks.hopskipjump import HopSkipJump
from fortify.attacks.square import Square
from fortify.attacks.transfer import Transfer

# attacks that never read the evaluated model's gradient: without a gradient attack there is
# nothing to warn about (and a model served without autograd must still be evaluable)
GRADIENT_FREE = (Square, HopSkipJump, Transfer)
MAX_ZERO_SHARE = 0.5  # a few saturated examples are normal; half the batch is not


@dataclass
class GradientCheck:
    warnings: list[str]
    connected: bool  # the output depends differentiably on the input at all


def check_gradients(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack]) -> GradientCheck:
    """Warnings when the input gradients of the cross-entropy at ``(x, y)`` are zero or not finite."""
    if not len(y) or all(isinstance(attack, GRADIENT_FREE) for attack in attacks):
        return GradientCheck([], connected=True)
    grad = input_gradient(model, x, y)
    if grad is None:
        return GradientCheck([_zero_warning(len(y), len(y))], connected=False)
    flat = grad.reshape(len(y), -1)
    non_finite = ~torch.isfinite(flat).all(dim=1)
    zero = (flat == 0).all(dim=1) & ~non_finite
    warnings = []
    if bool(non_finite.any()):
        warnings.append(f"{int(non_finite.sum())} of {len(y)} examples have a non-finite (NaN or Inf) "
                        "input gradient: gradient attacks cannot follow it, so the robust accuracy "
                        "overstates robustness; fix the model's numerics (e.g. log of 0, division by 0)")
    if float(zero.float().mean()) > MAX_ZERO_SHARE:
        warnings.append(_zero_warning(int(zero.sum()), len(y)))
    return GradientCheck(warnings, connected=True)


def _zero_warning(zero: int, total: int) -> str:
    return (f"{zero} of {total} examples have an all-zero input gradient: the model detaches, rounds "
            "or thresholds its input (or saturates its softmax), so gradient attacks stall and the "
            "robust accuracy overstates robustness; evaluate with BPDA for a non-differentiable step, "
            "or with black-box attacks (square)")


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
    """Gradient of the summed cross-entropy with respect to ``x``; None where no graph leads back."""
    point = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(point).float(), y, reduction="sum")
        if not loss.requires_grad:  # e.g. a one-hot argmax output
            return None
        (grad,) = torch.autograd.grad(loss, point, allow_unused=True)
    return grad  # None: the graph runs through the weights only (a detached input)


class ZeroGradientPath(nn.Module):
    """``model`` plus an input-dependent zero, so its input gradient exists and is exactly zero.

    Without a graph back to the input, gradient attacks fail inside autograd; with this path they
    stall at their start, the evaluation finishes, its black-box attacks still count, and the
    report carries the warning.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if hasattr(model, "average_objective"):  # EOT's mean loss, kept (see AutocastModel)
            self.average_objective = self._average_objective_with_zero_path

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return logits + _input_zero(x).unsqueeze(1).to(logits.dtype)

    def _average_objective_with_zero_path(self, x: Tensor, loss: Callable[[Tensor], Tensor]
                                          ) -> tuple[Tensor, Tensor]:
        mean_loss, logits = self.model.average_objective(x, loss)
        return mean_loss + _input_zero(x).to(mean_loss.dtype), logits


def _input_zero(x: Tensor) -> Tensor:
    """One zero per example that depends on the input, so a gradient with respect to it exists."""
    return 0.0 * x.reshape(len(x), -1).sum(dim=1)
