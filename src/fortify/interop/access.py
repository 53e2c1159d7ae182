"""White-box or black-box: does a model give usable input gradients?

A converted model may run outside autograd (onnxruntime), contain a step without a gradient
(rounding, argmax) or fail in backward. Gradient attacks on such a model fail silently and
overstate robustness, so fortify measures the gradient once on a sample batch and lets only
query-based attacks run when it is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fortify.models.modes import restore_modes, save_modes

WHITE_BOX = "white-box"
BLACK_BOX = "black-box"


@dataclass(frozen=True)
class Access:
    kind: Literal["white-box", "black-box"]
    reason: str

    @property
    def white_box(self) -> bool:
        return self.kind == WHITE_BOX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_gradients(model: nn.Module, x: Tensor) -> Access:
    """Differentiate each example's top logit with respect to its input, in eval mode.

    The top logit rather than a loss: a confident model's cross-entropy gradient can underflow
    to exactly zero, which would misread a differentiable model as gradient-free.
    """
    modes = save_modes(model)
    model.eval()
    try:
        device = next(model.parameters()).device
        x = x.detach().to(device).requires_grad_(True)
        with torch.enable_grad():
            top_logits = model(x).max(dim=1).values.sum()
            if not top_logits.requires_grad:
                return Access(BLACK_BOX, "the model's outputs are not connected to its inputs in "
                                         "autograd (it runs outside torch)")
            (gradient,) = torch.autograd.grad(top_logits, x, allow_unused=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:  # Keras raises more than torch
        return Access(BLACK_BOX, f"backward through the model fails: {err}")
    finally:
        restore_modes(modes)
    return _judge(gradient)


def _judge(gradient: Tensor | None) -> Access:
    if gradient is None:
        return Access(BLACK_BOX, "the model's outputs do not depend on its inputs in autograd")
    if not torch.isfinite(gradient).all():
        return Access(BLACK_BOX, "the input gradient holds NaN or infinite values")
    per_example = gradient.reshape(len(gradient), -1).abs().amax(dim=1)
    if bool((per_example == 0).all()):
        return Access(BLACK_BOX, "the input gradient is zero on every example of a sample batch "
                                 "(a step without a gradient, such as rounding or argmax)")
    return Access(WHITE_BOX, f"input gradients are finite and non-zero on {int((per_example > 0).sum())} "
                             f"of {len(per_example)} sample inputs")
