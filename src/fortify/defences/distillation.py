"""Defensive distillation (Papernot, McDaniel, Wu, Jha & Swami, IEEE S&P 2016).

The defence trains a teacher with ``softmax(z / T)`` at a high temperature ``T``, trains a student on
the teacher's soft labels at the same ``T``, and deploys the student at temperature 1. The student's
logits come out about ``T`` times larger than those of a model trained at temperature 1, so its
softmax saturates: in float32 the cross-entropy gradient underflows to exactly zero for most inputs
and attacks that follow it stall, while the decision boundary has not moved. Carlini & Wagner
(2017) break it by attacking the logits instead of the softmax.

``DefensiveDistillation`` reproduces the deployed student's defining property, its logit scale, by
multiplying a trained model's logits by ``T``. The decisions are the wrapped model's, so any gain in
"robustness" it shows is gradient masking by construction. ``distillation_loss`` is the soft-label
objective for training a real student.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fortify.defences.base import DEFENCES, check_number_in
from fortify.errors import DataError


class DefensiveDistillation(nn.Module):
    """Logits of a student distilled at temperature ``T`` and deployed at 1: ``T * model(x)``."""

    def __init__(self, model: nn.Module, *, temperature: float = 100.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = check_number_in("temperature", temperature, above=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy of the student's ``softmax(z / T)`` against the teacher's at the same ``T``."""
    temperature = check_number_in("temperature", temperature, above=0)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise DataError(f"student and teacher logits must both have shape (N, classes), got "
                        f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    soft_labels = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(soft_labels * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


DEFENCES.add("distillation", DefensiveDistillation)
