"""Predictions from logits: the plain class, and the class beyond float rounding."""

from __future__ import annotations

import math

import pytest
import torch

from fortify.models.predictions import (
    NO_CLASS,
    fooled_beyond_rounding,
    predicted_class,
    reached_beyond_rounding,
    rounding_margin,
)


def test_a_nan_row_predicts_no_class():
    logits = torch.tensor([[0.0, 1.0], [math.nan, 5.0]])
    assert predicted_class(logits).tolist() == [1, NO_CLASS]


def test_the_rounding_margin_scales_with_the_rows_largest_logit_and_the_precision():
    # ... and is never below 1e-5, a tie in log-odds, however small the logits
    logits = torch.tensor([[1.0, -200.0, 3.0], [0.5, 0.25, -0.125], [0.002, -0.001, 0.0]])
    torch.testing.assert_close(rounding_margin(logits), torch.tensor([2e-3, 1e-5, 1e-5]), rtol=1e-6, atol=0)
    # half precision: four units in the last place of the largest logit's scale
    bf16 = rounding_margin(torch.tensor([[8.0, 1.0]], dtype=torch.bfloat16))
    assert float(bf16) == pytest.approx(4 * torch.finfo(torch.bfloat16).eps * 8.0, rel=1e-2)


def test_fooled_beyond_rounding_needs_another_class_ahead_by_more_than_the_margin():
    # Prepare: the label is class 0; the largest logit is 10, so the margin is 1e-4
    base = torch.tensor([10.0, 0.0, -1.0])
    rows = []
    for lead in (-1.0, 0.5e-4, 2e-4, 1.0):  # how far class 1 lies ahead of the label
        row = base.clone()
        row[1] = row[0] + lead
        rows.append(row)
    logits = torch.stack(rows)
    y = torch.zeros(4, dtype=torch.int32)  # any integer label dtype
    # Execute
    fooled = fooled_beyond_rounding(logits, y)
    # Assert: behind, or ahead by less than the margin, is not enough; ahead beyond it is
    assert fooled.tolist() == [False, False, True, True]
    assert (predicted_class(logits) != y).tolist() == [False, True, True, True]


def test_reached_beyond_rounding_needs_the_target_ahead_of_every_other_class():
    # Prepare: target class 2; class 1 sits 1.0 below the target in the first row and 0.5e-4 below in
    # the second (margin 1e-4 of the largest logit 10); the label's logit does not matter
    logits = torch.tensor([[0.0, 9.0, 10.0], [0.0, 10.0 - 0.5e-4, 10.0], [0.0, 10.0, 9.0]])
    target = torch.tensor([2, 2, 2])
    assert reached_beyond_rounding(logits, target).tolist() == [True, False, False]


def test_nan_and_infinite_rows_follow_the_plain_prediction():
    # a NaN row predicts no class: fooled for any label, never the target; an infinite logit makes the
    # margin infinite, so the plain prediction decides
    logits = torch.tensor([[math.nan, 0.0], [math.inf, 0.0], [0.0, math.inf]])
    labels = torch.tensor([0, 0, 0])
    assert fooled_beyond_rounding(logits, labels).tolist() == [True, False, True]
    assert reached_beyond_rounding(logits, torch.tensor([0, 0, 1])).tolist() == [False, True, True]
