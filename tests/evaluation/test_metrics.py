"""Metric formulas on hand-made tensors, their invariants, and parity with evaluate()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fortify.attacks import PGD
from fortify.errors import ConfigError, DataError, ThreatModelViolation
from fortify.evaluation import evaluate
from fortify.evaluation.metrics import (
    accuracy,
    adversarial_metrics,
    attack_metrics,
    class_report,
    class_reports,
    distance_summary,
    entropy_shift,
    eps_curve_auc,
    harmonic_robustness,
    margin_shift,
    minimal_distances_from_sweep,
    normalized_entropy,
    robustness_score,
)
from fortify.threat import ThreatModel


def _logits_for(predictions: list[int], num_classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is each given class, with a margin of 2."""
    return 2.0 * torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


# -- accuracy, success rate, perturbation norms ----------------------------------------------------

def test_attack_metrics_count_only_clean_correct_examples():
    # Prepare: 4 of 5 correct clean; the attack flips examples 0, 2 and 4 (3 is already wrong)
    y = torch.tensor([0, 1, 2, 0, 1])
    clean, adv = _logits_for([0, 1, 2, 1, 1]), _logits_for([1, 1, 0, 2, 0])
    x = torch.zeros(5, 4)
    x_adv = x + torch.tensor([0.1, 0.05, 0.3, 0.2, 0.2]).unsqueeze(1)
    # Execute
    m = attack_metrics(x, x_adv, y, clean, adv, ThreatModel("linf", 0.5))
    # Assert
    assert (m.n_examples, m.n_clean_correct, m.n_successful) == (5, 4, 3)
    assert m.clean_accuracy == pytest.approx(0.8)
    assert m.adversarial_accuracy == pytest.approx(0.2)
    assert m.success_rate == pytest.approx(0.75)
    assert m.adversarial_accuracy == pytest.approx(m.clean_accuracy * (1 - m.success_rate))
    assert m.mean_norm_successful == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert m.median_norm_successful == pytest.approx(0.2)


def test_a_row_of_nan_logits_is_never_correct_nor_robust():
    # Prepare: labels of class 0, where argmax puts a NaN row; example 2 is fine clean and NaN attacked
    y = torch.tensor([0, 0, 0, 1])
    clean = _logits_for([0, 0, 0, 1])
    clean[1] = math.nan
    adv = clean.clone()
    adv[2, 1] = math.nan
    x = torch.zeros(4, 2)
    # Execute
    m = attack_metrics(x, x, y, clean, adv, ThreatModel("linf", 0.1))
    reports = class_reports(clean, adv, y)
    # Assert: a NaN row predicts no class: wrong clean, fooled under attack, in no confusion column
    assert accuracy(clean, y) == pytest.approx(0.75)
    assert (m.n_clean_correct, m.n_successful) == (3, 1)
    assert m.adversarial_accuracy == pytest.approx(0.5)
    assert reports.adversarial.confusion == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]  # two class-0 rows: nothing
    assert reports.adversarial.recall == pytest.approx([1 / 3, 1.0, 0.0])
    assert reports.adversarial.precision == pytest.approx([1.0, 1.0, 0.0])
    assert reports.adversarial.macro_recall == pytest.approx((1 / 3 + 1.0) / 2)  # class 2 absent


def test_a_median_between_an_infinite_and_a_finite_value_is_infinite():
    # margins -inf (a class the model rules out under attack) and 0: numpy's arithmetic gives NaN
    clean = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adversarial = torch.tensor([[-math.inf, 0.0], [0.0, 0.0]])
    shift = margin_shift(clean, adversarial, torch.tensor([0, 0]))
    assert shift.adversarial_median == -math.inf
    assert distance_summary(torch.tensor([0.1, 0.2, math.inf, math.inf]), eps=[0.1]).q3 == math.inf


def test_every_median_takes_the_mean_of_the_two_middle_values_as_numpy_does():
    # two successful examples at norms 0.1 and 0.3; margins 4 and 1 clean, -2 and -4 under attack
    y = torch.tensor([0, 0])
    x = torch.zeros(2, 4)
    x_adv = x + torch.tensor([0.1, 0.3]).unsqueeze(1)
    clean = torch.tensor([[4.0, 0.0], [1.0, 0.0]])
    adversarial = torch.tensor([[0.0, 2.0], [0.0, 4.0]])
    m = attack_metrics(x, x_adv, y, clean, adversarial, ThreatModel("linf", 0.5))
    assert m.median_norm_successful == pytest.approx(np.median([0.1, 0.3]))
    shift = margin_shift(clean, adversarial, y)
    assert (shift.clean_median, shift.adversarial_median) == pytest.approx((2.5, -3.0))


def test_a_margin_needs_a_second_class():
    one_class = torch.zeros(3, 1)
    with pytest.raises(DataError, match="K >= 2"):
        margin_shift(one_class, one_class, torch.zeros(3, dtype=torch.long))


def test_attack_metrics_l2_norms_and_the_empty_cases():
    y = torch.tensor([0, 1])
    x = torch.zeros(2, 4)
    x_adv = x + torch.tensor([[0.3, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m = attack_metrics(x, x_adv, y, _logits_for([0, 1]), _logits_for([2, 1]), ThreatModel("l2", 1.0))
    assert m.mean_norm_successful == pytest.approx(0.5)
    none_correct = attack_metrics(x, x, y, _logits_for([1, 0]), _logits_for([1, 0]), ThreatModel("l2", 1.0))
    assert none_correct.success_rate is None and none_correct.mean_norm_successful is None
    assert json.loads(json.dumps(none_correct.to_dict()))["success_rate"] is None
    with pytest.raises(DataError, match="logits"):
        accuracy(torch.zeros(3), y)


# -- one-number summaries --------------------------------------------------------------------------

def test_harmonic_robustness_formula_and_its_properties():
    assert harmonic_robustness(0.9, 0.5) == pytest.approx(2 * 0.9 * 0.5 / 1.4)
    assert harmonic_robustness(0.9, 0.0) == 0.0 and harmonic_robustness(0.0, 0.0) == 0.0
    assert harmonic_robustness(0.6, 0.6) == pytest.approx(0.6)
    for c, w in [(0.99, 0.1), (0.7, 0.4), (0.5, 0.45)]:
        h = harmonic_robustness(c, w)
        assert min(c, w) <= h <= (c + w) / 2  # pulled towards the weaker of the two
    with pytest.raises(DataError, match="worst_case_accuracy"):
        harmonic_robustness(0.9, 1.5)


def test_eps_auc_is_the_trapezoid_mean_including_the_clean_point():
    # clean 0.9 at 0, then 0.5 at 0.1 and 0.2 at 0.2; given out of order
    auc = eps_curve_auc([0.2, 0.1], [0.2, 0.5], clean_accuracy=0.9)
    assert auc == pytest.approx((0.1 * (0.9 + 0.5) / 2 + 0.1 * (0.5 + 0.2) / 2) / 0.2)
    # cut at 0.15: the accuracy there is interpolated to 0.35
    cut = eps_curve_auc([0.1, 0.2], [0.5, 0.2], clean_accuracy=0.9, eps_max=0.15)
    assert cut == pytest.approx((0.1 * (0.9 + 0.5) / 2 + 0.05 * (0.5 + 0.35) / 2) / 0.15)
    assert eps_curve_auc([0.1, 0.3], [0.7, 0.7], clean_accuracy=0.7) == pytest.approx(0.7)


def test_eps_auc_rejects_what_it_cannot_integrate():
    with pytest.raises(ConfigError, match="eps_max"):
        eps_curve_auc([0.1], [0.5], 0.9, eps_max=0.2)
    with pytest.raises(DataError, match="distinct"):
        eps_curve_auc([0.1, 0.1], [0.5, 0.4], 0.9)
    with pytest.raises(DataError, match="one accuracy per eps"):
        eps_curve_auc([0.1, 0.2], [0.5], 0.9)


def test_robustness_score_combines_both_summaries():
    score = robustness_score(0.9, 0.3, eps=[0.1, 0.2], eps_accuracy=[0.5, 0.3])
    assert score.harmonic_mean == pytest.approx(harmonic_robustness(0.9, 0.3))
    assert score.eps_auc == pytest.approx(eps_curve_auc([0.1, 0.2], [0.5, 0.3], 0.9))
    assert score.eps_max == 0.2
    assert robustness_score(0.9, 0.3).to_dict()["eps_auc"] is None
    for orphan in ({"eps_accuracy": [0.5]}, {"eps_max": 0.3}, {"eps": [], "eps_accuracy": [0.5]}):
        with pytest.raises(DataError, match="need the eps curve's eps"):
            robustness_score(0.9, 0.3, **orphan)


# -- minimal distances -----------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [[-0.1, 0.2], [0.1, math.nan], [0.1, math.inf]])
def test_a_sweep_with_an_eps_that_is_no_distance_is_refused(eps):
    # a negative or NaN eps became some example's "distance to the boundary"
    with pytest.raises(DataError, match="finite numbers >= 0"):
        minimal_distances_from_sweep(eps, torch.ones(2, 3, dtype=torch.bool))


def test_minimal_distances_are_the_first_eps_that_fools():
    fooled = torch.tensor([[True, False, False, False],
                           [True, True, False, False],
                           [True, True, True, False]])
    d = minimal_distances_from_sweep([0.05, 0.1, 0.2], fooled)
    assert d.tolist() == [0.05, 0.1, 0.2, math.inf]


def test_distance_summary_quartiles_and_fractions():
    d = torch.tensor([0.0, 0.1, 0.2, 0.3, math.inf])
    s = distance_summary(d, eps=[0.15, 0.3])
    assert (s.q1, s.median, s.q3) == pytest.approx((0.1, 0.2, 0.3))
    assert s.fraction_below == pytest.approx([0.4, 0.8])
    assert s.n_not_found == 1
    mostly_robust = distance_summary(torch.tensor([0.1, math.inf, math.inf, math.inf]), eps=[0.1])
    assert mostly_robust.median == math.inf
    assert json.loads(json.dumps(mostly_robust.to_dict()))["median"] is None


def test_distance_quartiles_match_numpy_on_finite_data():
    d = torch.rand(37, generator=torch.Generator().manual_seed(0))
    s = distance_summary(d, eps=[0.5])
    assert [s.q1, s.median, s.q3] == pytest.approx(np.quantile(d.numpy(), [0.25, 0.5, 0.75]).tolist())
    with pytest.raises(DataError, match="NaN"):
        distance_summary(torch.tensor([0.1, math.nan]), eps=[0.1])


# -- confidence under attack ----------------------------------------------------------------------

def test_normalized_entropy_on_known_distributions():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    expected = -(p * p.log()).sum() / math.log(3)
    assert normalized_entropy(p.log()).item() == pytest.approx(expected.item())
    assert normalized_entropy(torch.zeros(2, 5)).tolist() == pytest.approx([1.0, 1.0])
    assert normalized_entropy(torch.tensor([[1000.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)
    # a row with a NaN predicts no class: fully uncertain, not "certain" and not a NaN that would
    # make the mean null; +inf logits share the probability (softmax alone gives NaN)
    assert normalized_entropy(torch.tensor([[float("nan"), 0.0, 0.0]])).item() == 1.0
    assert normalized_entropy(torch.tensor([[math.inf, 0.0, 0.0]])).item() == 0.0
    assert normalized_entropy(torch.tensor([[math.inf, math.inf, 0.0, 0.0]])).item() == pytest.approx(0.5)


def test_entropy_and_margin_shifts():
    clean = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    adv = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    margins = margin_shift(clean, adv, y)
    assert (margins.clean_mean, margins.adversarial_mean) == pytest.approx((3.0, -0.5))
    assert margins.shift == pytest.approx(-3.5)
    entropies = entropy_shift(clean, adv)
    clean_each, adv_each = normalized_entropy(clean), normalized_entropy(adv)
    assert (entropies.clean_mean, entropies.adversarial_mean) == pytest.approx(
        (float(clean_each.mean()), float(adv_each.mean())))
    assert entropies.adversarial_mean == pytest.approx((_entropy_of([1.0, 2.0, 0.0]) + 1.0) / 2)
    assert entropies.shift == pytest.approx(entropies.adversarial_mean - entropies.clean_mean)


def _entropy_of(logits: list[float]) -> float:
    p = torch.tensor(logits, dtype=torch.float64).softmax(0)
    return float(-(p * p.log()).sum() / math.log(len(logits)))


def test_a_nan_row_is_never_robust_in_the_margin_and_fully_uncertain_in_the_entropy():
    # Prepare: adversarial margins nan (row 0), -1 and -2
    clean = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    adversarial = torch.tensor([[float("nan"), 0.0], [0.0, 1.0], [0.0, 2.0]])
    y = torch.zeros(3, dtype=torch.long)
    # Execute
    margins, entropies = margin_shift(clean, adversarial, y), entropy_shift(clean, adversarial)
    # Assert: the NaN row is the least robust (median -2, not -1 as a NaN sorted last would give)
    assert margins.adversarial_median == -2.0 and margins.adversarial_mean == -math.inf
    expected = (1.0 + _entropy_of([0.0, 1.0]) + _entropy_of([0.0, 2.0])) / 3
    assert entropies.adversarial_mean == pytest.approx(expected)


# -- per-class quality ----------------------------------------------------------------------------

def test_class_report_on_a_hand_made_confusion():
    # Prepare: class 2 is never predicted; class 0 is over-predicted
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 0, 1])
    # Execute
    r = class_report(pred, y, num_classes=3)
    # Assert
    assert r.confusion == [[2, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert r.precision == pytest.approx([0.5, 0.5, 0.0])
    assert r.recall == pytest.approx([1.0, 0.5, 0.0])
    assert r.f1 == pytest.approx([2 / 3, 0.5, 0.0])
    assert r.support == [2, 2, 2]
    assert r.macro_f1 == pytest.approx((2 / 3 + 0.5) / 3)
    assert r.macro_recall == pytest.approx(0.5)


def test_macro_averages_skip_classes_neither_in_the_labels_nor_predicted():
    # perfect predictions on a test set holding 3 of 4 classes: nothing went wrong
    y = torch.tensor([0, 1, 2, 2])
    r = class_report(y.clone(), y, num_classes=4)
    assert (r.macro_precision, r.macro_recall, r.macro_f1) == pytest.approx((1.0, 1.0, 1.0))
    assert r.support == [1, 1, 2, 0] and r.f1[3] == 0.0
    # a class only predicted (an attack moving examples into it) still counts, with precision 0
    moved = class_report(torch.tensor([0, 1, 3, 2]), y, num_classes=4)
    assert moved.macro_precision == pytest.approx((1 + 1 + 1 + 0) / 4)


# -- on a real attack ------------------------------------------------------------------------------

def test_adversarial_metrics_agree_with_evaluate(standard_model, digits):
    # Prepare
    x, y = digits.test.x, digits.test.y
    threat = ThreatModel("linf", 0.1)
    attack = PGD(threat, steps=10)
    # Execute
    report = evaluate(standard_model, x, y, [attack], threat, batch_size=len(y))
    correct = torch.tensor(report.clean_correct)
    x_adv = x.clone()
    x_adv[correct] = attack(standard_model, x[correct], y[correct])  # evaluate attacks these only
    with torch.no_grad():
        m = adversarial_metrics(x, x_adv, y, standard_model(x), standard_model(x_adv), threat)
    # Assert
    result = report.attacks[0]
    assert m.attack.clean_accuracy == pytest.approx(report.clean_accuracy)
    assert m.attack.adversarial_accuracy == pytest.approx(result.adversarial_accuracy)
    assert m.attack.success_rate == pytest.approx(result.success_rate)
    assert m.attack.median_norm_successful == pytest.approx(result.median_norm_successful)
    assert m.margin.adversarial_mean < m.margin.clean_mean
    assert m.entropy.adversarial_mean > m.entropy.clean_mean
    assert m.classes.adversarial.macro_f1 < m.classes.clean.macro_f1
    assert sum(map(sum, m.classes.clean.confusion)) == len(y)
    json.dumps(m.to_dict())


# -- inconsistent inputs ---------------------------------------------------------------------------

_Y = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: accuracy(_logits_for([0, 1, 2, 0]), torch.tensor([0, 1, 3, 0])), DataError, "3 classes"),
    (lambda: accuracy(_logits_for([0, 1, 2, 0]), _Y.float()), DataError, "integer class indices"),
    (lambda: margin_shift(_logits_for([0, 1, 2, 0]), _logits_for([0, 1, 2, 0]), torch.tensor([0, 1, 9, 0])),
     DataError, "3 classes"),
    (lambda: entropy_shift(torch.randn(4, 3), torch.randn(3, 3)), DataError, "same non-empty shape"),
    (lambda: entropy_shift(torch.randn(0, 3), torch.randn(0, 3)), DataError, "same non-empty shape"),
    (lambda: class_reports(_logits_for([0, 1, 2, 0]), _logits_for([0, 1, 2, 0]), _Y, num_classes=5),
     DataError, "num_classes=5 but the logits score 3"),
    (lambda: class_report(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 7, 0]), 3), DataError,
     r"labels range over \[0, 7\]"),
    (lambda: class_report(torch.tensor([0, 1, 2, 0]), _Y, 0), ConfigError, "num_classes must be"),
    (lambda: harmonic_robustness(0.5, 0.8), DataError, "exceeds clean accuracy"),
    (lambda: eps_curve_auc([0.1], [0.95], 0.9), DataError, "cannot exceed clean accuracy"),
    (lambda: distance_summary(torch.tensor([0.1, 0.2]), [-1.0, math.nan]), DataError, "finite numbers > 0"),
    # adversarial logits over another class count: a class index means something else in each
    (lambda: margin_shift(_logits_for([0, 1, 2, 0]), _logits_for([0, 1, 2, 0], 4), _Y), DataError,
     "same shape"),
    (lambda: class_reports(_logits_for([0, 1, 2, 0]), _logits_for([0, 1, 2, 0], 4), _Y), DataError,
     "same shape"),
    (lambda: attack_metrics(torch.zeros(4, 2), torch.zeros(4, 2), _Y, _logits_for([0, 1, 2, 0]),
                            _logits_for([0, 1, 2, 0], 4), ThreatModel("linf", 0.1)), DataError, "same shape"),
])
def test_inconsistent_inputs_are_named(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_give_the_int64_metrics(dtype):
    # they passed the label check, then failed in torch's gather
    clean, adv = _logits_for([0, 1, 2, 0]), _logits_for([1, 1, 0, 0])
    x = torch.full((4, 2), 0.5)
    threat = ThreatModel("linf", 0.1)
    narrow = adversarial_metrics(x, x, _Y.to(dtype), clean, adv, threat).to_dict()
    assert narrow == adversarial_metrics(x, x, _Y, clean, adv, threat).to_dict()
    assert accuracy(clean, _Y.to(dtype)) == 1.0


def test_a_numpy_integer_class_count_is_a_class_count():
    report = class_report(torch.tensor([0, 1, 2, 0]), _Y, np.int64(3))
    assert report.labels == [0, 1, 2] and report.macro_f1 == 1.0


@pytest.mark.parametrize("bad", [1.5, math.nan], ids=["outside the box", "nan"])
def test_attack_metrics_blame_a_bad_clean_input_not_the_attack(bad):
    x = torch.full((4, 2), 0.5)
    x[2, 1] = bad
    with pytest.raises(DataError, match="box|NaN"):
        attack_metrics(x, x, _Y, _logits_for([0, 1, 2, 0]), _logits_for([0, 1, 2, 0]),
                       ThreatModel("linf", 0.1))


def test_attack_metrics_refuse_points_outside_the_ball():
    threat = ThreatModel("linf", 0.1)
    x = torch.full((4, 1, 2, 2), 0.5)
    with pytest.raises(ThreatModelViolation, match="4 of the adversarial points lie outside"):
        attack_metrics(x, x + 0.3, _Y, _logits_for([0, 1, 2, 0]), _logits_for([1, 2, 0, 1]), threat)


def test_sweep_distances_of_examples_misclassified_clean_are_zero_when_told():
    fooled = torch.tensor([[True, False, False], [True, True, False]])  # eps 0.1, 0.2
    assert minimal_distances_from_sweep([0.1, 0.2], fooled).tolist() == [0.1, 0.2, math.inf]
    clean_correct = torch.tensor([False, True, True])
    assert minimal_distances_from_sweep([0.1, 0.2], fooled, clean_correct).tolist() == [0.0, 0.2, math.inf]


def test_infinite_logits_give_defined_margins_and_entropies():
    # a tie at +inf (an fp16 overflow) was inf - inf = NaN, which blanked the mean and moved the
    # median; a row of -inf throughout had an entropy of NaN
    y = torch.tensor([0, 0, 0])
    clean = torch.tensor([[4.0, 1.0], [4.0, 1.0], [4.0, 1.0]])
    adversarial = torch.tensor([[math.inf, math.inf], [2.0, 1.0], [1.0, 0.0]])
    shift = margin_shift(clean, adversarial, y)
    assert (shift.adversarial_mean, shift.adversarial_median) == (pytest.approx(2 / 3), 1.0)
    entropy = normalized_entropy(torch.tensor([[-math.inf, -math.inf, -math.inf], [math.inf, 0.0, math.inf]]))
    assert entropy.tolist() == pytest.approx([1.0, math.log(2) / math.log(3)])
