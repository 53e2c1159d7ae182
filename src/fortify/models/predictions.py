"""The class a model predicts from its logits, where a row with a NaN predicts no class.

``torch.argmax`` ranks NaN above every number, so a row of NaN logits would "predict" the index of
its first NaN: with label 0 it counted as correct, and under attack as robust, and smoothing counted
it as a vote for class 0. Every prediction that is compared with a label goes through here instead.
Infinite logits keep their meaning (a log-probability of -inf is a class the model rules out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fortify.threat import LOW_PRECISION

NO_CLASS = -1  # the prediction of a row with a NaN logit: equal to no label and no target


def at_least_fp32(logits: Tensor) -> Tensor:
    """``logits`` (or any tensor whose arithmetic half precision cannot hold, as for a loss head):
    cast to fp32 from bf16 or fp16, else as they are (float64 stays float64). The gradient flows
    back through the cast."""
    return logits.float() if logits.dtype in LOW_PRECISION else logits


def predicted_class(logits: Tensor) -> Tensor:
    """Per row of ``logits (N, K)`` the index of its largest logit, or ``NO_CLASS`` for a row with a NaN."""
    return torch.where(logits.isnan().any(dim=1), NO_CLASS, logits.argmax(dim=1))


_LEAST_MARGIN = 1e-5  # log-odds


def rounding_margin(logits: Tensor) -> Tensor:
    """Per row of ``logits (N, K)`` the logit gap that float rounding alone can open or close.

    The same input gives slightly different logits in batches of other sizes (on CPU oneDNN picks
    other kernels below a few rows): on the digits CNN by under a millionth of the row's largest
    logit. A point that fools a model by less than that may be judged correct in another batch; this
    margin is ten times that in float32 and four units in the last place in half precision, and at
    least 1e-5 (a tie in log-odds at any scale): logits near 0 are often sums that cancel, whose
    float32 rounding follows the size of their terms, not of the sum (a two-class linear model over
    3x32x32 inputs, its logits near 0.002 at the boundary, swapped its verdict between batches of 1
    and 4 by 1.3e-7, which ten millionths of 0.002 did not cover).
    """
    if not logits.is_floating_point():
        return torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    relative = max(1e-5, 4 * torch.finfo(logits.dtype).eps)
    return (relative * logits.detach().abs().amax(dim=1)).clamp_min(_LEAST_MARGIN)


def fooled_beyond_rounding(logits: Tensor, y: Tensor) -> Tensor:
    """Rows whose prediction is not ``y`` by more than ``rounding_margin``: some other logit exceeds
    the label's by that margin, so a batch of another size judges the point adversarial too. A row
    with a NaN (no class) counts as fooled, as with ``predicted_class``; a row with an infinite logit
    falls back to the plain prediction."""
    gap = _largest_other(logits, y) - _logit_of(logits, y)
    margin = rounding_margin(logits)
    plain = predicted_class(logits) != y
    return torch.where(torch.isfinite(margin), gap > margin, plain) | logits.isnan().any(dim=1)


def reached_beyond_rounding(logits: Tensor, target: Tensor) -> Tensor:
    """Rows that predict ``target`` by more than ``rounding_margin`` over every other class (a row with
    an infinite logit: the plain prediction; a row with a NaN never)."""
    gap = _logit_of(logits, target) - _largest_other(logits, target)
    margin = rounding_margin(logits)
    plain = predicted_class(logits) == target
    return torch.where(torch.isfinite(margin), gap > margin, plain) & ~logits.isnan().any(dim=1)


def _logit_of(logits: Tensor, classes: Tensor) -> Tensor:
    return logits.detach().gather(1, classes[:, None].long()).squeeze(1)


def _largest_other(logits: Tensor, classes: Tensor) -> Tensor:
    """Per row the largest logit of a class other than ``classes``."""
    others = logits.detach().clone()
    others.scatter_(1, classes[:, None].long(), -torch.inf)
    return others.amax(dim=1)
