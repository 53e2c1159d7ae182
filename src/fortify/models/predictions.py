"""The class a model predicts from its logits, where a row with a NaN predicts no class.

``torch.argmax`` ranks NaN above every number, so a row of NaN logits would "predict" the index of
its first NaN: with label 0 it counted as correct, and under attack as robust, and smoothing counted
it as a vote for class 0. Every prediction that is compared with a label goes through here instead.
Infinite logits keep their meaning (a log-probability of -inf is a class the model rules out).
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_CLASS = -1  # the prediction of a row with a NaN logit: equal to no label and no target


def predicted_class(logits: Tensor) -> Tensor:
    """Per row of ``logits (N, K)`` the index of its largest logit, or ``NO_CLASS`` for a row with a NaN."""
    return torch.where(logits.isnan().any(dim=1), NO_CLASS, logits.argmax(dim=1))
