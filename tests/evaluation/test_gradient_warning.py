"""A model without a usable input gradient gets a warning, not a silent robust accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from counting import PassCounter
from fortify.attacks import FGSM, PGD, Square
from fortify.evaluation import evaluate
from fortify.evaluation.gradients import ZeroGradientPath, check_gradients, input_gradient
from fortify.threat import ThreatModel
from gradient_free import DetachedInput

THREAT = ThreatModel("linf", 0.2)


class _ArgmaxOneHot(nn.Module):
    """Scaled one-hot of the prediction: no graph at all behind the output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return 10.0 * F.one_hot(self.model(x).argmax(1), 10).float()


class _SquareRoot(nn.Module):
    """A square-root contrast curve in front of the model: infinite slope at the black pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.sqrt())


def _sample(digits, n=64):
    return digits.test.x[:n], digits.test.y[:n]


def test_a_detached_input_is_reported_and_fgsm_alone_would_have_looked_perfect(standard_model, digits):
    # Prepare
    x, y = _sample(digits)
    # Execute
    report = evaluate(DetachedInput(standard_model), x, y, [FGSM(THREAT)], THREAT)
    # Assert: FGSM cannot move (sign of a zero gradient), so robust equals clean accuracy
    assert report.worst_case_accuracy == report.clean_accuracy > 0.9
    assert any("all-zero input gradient" in w and "BPDA" in w for w in report.warnings), report.warnings


def test_an_argmax_one_hot_output_is_reported(standard_model, digits):
    x, y = _sample(digits)
    report = evaluate(_ArgmaxOneHot(standard_model), x, y, [PGD(THREAT, steps=5)], THREAT)
    correct = int(sum(report.clean_correct))
    assert any(f"{correct} of {correct} examples have an all-zero input gradient" in w
               for w in report.warnings), report.warnings
    # PGD's random start moves a few points; its steps, with no gradient to follow, move none further
    assert report.worst_case_accuracy >= report.clean_accuracy - 0.05


def test_a_model_without_a_graph_to_its_input_gets_a_zero_gradient_not_an_autograd_error(standard_model,
                                                                                          digits):
    # Prepare
    x, y = _sample(digits, 8)
    detached = DetachedInput(standard_model)
    # Execute
    check = check_gradients(detached, x, y, [FGSM(THREAT)])
    tied = ZeroGradientPath(detached)
    # Assert: same logits, a gradient that exists and is exactly zero
    assert not check.connected and input_gradient(detached, x, y) is None
    assert torch.equal(tied(x), detached(x))
    assert torch.equal(input_gradient(tied, x, y), torch.zeros_like(x))


def test_non_finite_gradients_are_reported_with_their_count(standard_model, digits):
    # Prepare: every digit has black (0) pixels, where d sqrt(x)/dx is infinite
    x, y = _sample(digits)
    model = _SquareRoot(standard_model)
    # Execute
    report = evaluate(model, x, y, [FGSM(THREAT)], THREAT)
    grad = input_gradient(model, x, y)
    # Assert
    correct = int(sum(report.clean_correct))
    assert not bool(torch.isfinite(grad).all())
    assert any(f"{correct} of {correct} examples have a non-finite (NaN or Inf) input gradient" in w
               for w in report.warnings), report.warnings


def test_a_trained_model_gets_no_gradient_warning(standard_model, digits):
    x, y = _sample(digits)
    report = evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT)
    assert not any("gradient" in w for w in report.warnings)
    assert report.worst_case_accuracy < report.clean_accuracy


def test_black_box_attacks_alone_need_no_gradient(standard_model, digits):
    # Square never reads the gradient: a model without one is evaluated without the warning
    x, y = _sample(digits, 16)
    report = evaluate(DetachedInput(standard_model), x, y, [Square(THREAT, n_queries=20)], THREAT)
    assert not any("gradient" in w for w in report.warnings)


def test_the_check_costs_one_forward_pass_on_the_first_batch_only(standard_model, digits):
    # Prepare
    x, y = _sample(digits)
    counting = PassCounter(standard_model)
    # Execute
    check = check_gradients(counting, x[:10], y[:10], [FGSM(THREAT)])
    # Assert
    assert check.warnings == [] and check.connected and counting.passes == 1


def test_the_gradient_is_the_cross_entropy_gradient():
    # Prepare: a linear model, whose input gradient of the summed CE is (softmax - onehot) @ W
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    # Execute
    grad = input_gradient(model, x, y)
    # Assert
    weight = model[1].weight
    expected = (F.softmax(model(x), 1) - F.one_hot(y, 3).float()) @ weight
    assert torch.allclose(grad.reshape(5, 4), expected, atol=1e-6)
