"""Metrics and scores in closed form: ROC interpolation, AUC, the statistics, LiRA's likelihood ratio."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import norm

from fortify.data import Split
from fortify.data.rows import shared_rows
from fortify.errors import ConfigError, DataError
from fortify.privacy import membership_result
from fortify.privacy._data import check_member_sets, locate
from fortify.privacy.lira import half_assignment, lira_scores, logit_confidence
from fortify.privacy.membership import confidence_scores, loss_scores, modified_entropy_scores
from fortify.privacy.metrics import min_nonmembers_for_fpr, roc_curve, tpr_at_fpr

NON_MEMBERS = torch.arange(100, dtype=torch.float64) / 100  # 0.00, 0.01, ..., 0.99


def _hand_made_members():
    # 2.0 and 0.995 beat every non-member, 0.985 beats all but 0.99, and the last member ties
    # with the non-member 0.98: the ROC goes (0, .5) -> (.01, .5) -> (.01, .75) -> (.02, 1.0)
    return torch.tensor([2.0, 0.995, 0.985, float(NON_MEMBERS[98])], dtype=torch.float64)


def test_tpr_at_fpr_reads_and_interpolates_the_roc():
    curve = roc_curve(_hand_made_members(), NON_MEMBERS)
    assert tpr_at_fpr(curve, 0.01, 100) == pytest.approx(0.75)  # best point with FPR <= 1%
    # between (.01, .75) and (.02, 1.0) lies a tie; randomising it reaches the straight line
    assert tpr_at_fpr(curve, 0.015, 100) == pytest.approx(0.875)
    assert tpr_at_fpr(curve, 0.02, 100) == pytest.approx(1.0)


def test_tpr_below_the_resolution_of_the_non_members_is_refused():
    curve = roc_curve(_hand_made_members(), NON_MEMBERS)
    with pytest.raises(DataError, match="needs at least 1000 non-members .* got 100"):
        tpr_at_fpr(curve, 0.001, 100)
    assert min_nonmembers_for_fpr(0.01) == 100
    assert min_nonmembers_for_fpr(0.001) == 1000
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        min_nonmembers_for_fpr(1.5)


def test_membership_result_summarises_a_hand_made_score_vector():
    result = membership_result("hand", _hand_made_members(), NON_MEMBERS, fprs=(0.01, 0.015))
    # AUC: each member's share of non-members below it (ties count half), averaged
    expected_auc = (1.0 + 1.0 + 0.99 + 0.985) / 4
    assert result.auc == pytest.approx(expected_auc)
    assert result.tpr_at_fpr == pytest.approx({"0.01": 0.75, "0.015": 0.875})
    assert result.advantage == pytest.approx(1.0 - 0.02)  # TPR 1 at FPR 0.02
    assert result.balanced_accuracy == pytest.approx((1 + 0.98) / 2)
    assert result.roc_fpr[0] == 0.0 and result.roc_fpr[-1] == 1.0


def test_perfectly_separated_scores_have_auc_one_and_reversed_ones_zero():
    members, non_members = torch.linspace(2, 3, 50), torch.linspace(0, 1, 200)
    perfect = membership_result("perfect", members, non_members)
    assert perfect.auc == 1.0 and perfect.advantage == 1.0 and perfect.tpr_at_fpr["0.01"] == 1.0
    assert membership_result("reversed", -members, -non_members).auc == 0.0
    tied = membership_result("tied", torch.zeros(50), torch.zeros(200))
    assert tied.auc == 0.5 and tied.advantage == 0.0


def test_default_fprs_keep_only_what_the_data_resolves():
    result = membership_result("r", torch.rand(10), torch.rand(150))
    assert list(result.tpr_at_fpr) == ["0.01"]
    assert result.notes == ["TPR at FPR 0.001 not reported: it needs 1000 non-members, there are 150"]


def test_nan_scores_are_refused():
    with pytest.raises(DataError, match="NaN"):
        membership_result("nan", torch.tensor([float("nan"), 1.0]), torch.zeros(3))


def test_infinite_scores_rank_beyond_every_finite_score():
    largest = np.finfo(np.float64).max
    # a member certain at +inf outscores a non-member at the largest float, instead of tying with it
    assert membership_result("+inf", [np.inf], [largest]).auc == 1.0
    assert membership_result("-inf", [-largest], [-np.inf]).auc == 1.0
    # the thresholds stay in the scores' units: the second flags the +inf member alone
    curve = roc_curve([np.inf, 1.0], [largest, 0.0])
    assert curve.thresholds.tolist() == [np.inf, np.inf, largest, 1.0, 0.0]
    assert curve.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert curve.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]


def _sklearn_tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR of scikit-learn's ROC at ``target``, read on the segments between its points."""
    best = 0.0
    for i in range(len(fpr) - 1):
        if fpr[i] <= target <= fpr[i + 1]:
            if fpr[i + 1] == fpr[i]:
                best = max(best, tpr[i], tpr[i + 1])
            else:
                share = (target - fpr[i]) / (fpr[i + 1] - fpr[i])
                best = max(best, tpr[i] + share * (tpr[i + 1] - tpr[i]))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_auc_roc_advantage_and_tpr_agree_with_scikit_learn_on_heavily_tied_scores(seed):
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    # Prepare: scores on a coarse grid, so most of them tie within and across the two sides
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 6, 40).astype(np.float64) + 1.0
    non_members = rng.integers(0, 7, 300).astype(np.float64)
    labels = np.r_[np.ones(members.size), np.zeros(non_members.size)]
    scores = np.r_[members, non_members]
    # Execute
    result = membership_result("tied", members, non_members, fprs=(0.01, 0.05, 0.2))
    curve = roc_curve(members, non_members)
    # Assert
    fpr, tpr, thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert curve.fpr.tolist() == fpr.tolist() and curve.tpr.tolist() == tpr.tolist()
    assert curve.thresholds[1:].tolist() == thresholds[1:].tolist()
    assert result.advantage == pytest.approx(float(np.max(tpr - fpr)), abs=1e-12)
    for target in (0.01, 0.05, 0.2):
        assert result.tpr_at_fpr[repr(target)] == pytest.approx(_sklearn_tpr_at(fpr, tpr, target), abs=1e-12)


def test_a_numpy_float_fpr_is_the_number_it_prints():
    # np.float32(0.01) is exactly 0.009999999776: read literally it would need 101 non-members
    result = membership_result("f32", _hand_made_members(), NON_MEMBERS, fprs=[np.float32(0.01)])
    assert result.tpr_at_fpr == pytest.approx({"0.01": 0.75})
    assert min_nonmembers_for_fpr(np.float32(0.001)) == 1000
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        membership_result("f32", _hand_made_members(), NON_MEMBERS, fprs=[np.float32(1.5)])


# -- statistics --------------------------------------------------------------------------------------

def test_statistics_match_their_definitions_on_known_probabilities():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]], dtype=torch.float64)
    logits, y = p.log(), torch.tensor([0, 2])
    assert torch.allclose(loss_scores(logits, y), torch.tensor([math.log(0.7), math.log(0.05)],
                                                               dtype=torch.float64))
    # the confidence is ranked by its logit: log(p / (1 - p)), the same order as p
    assert torch.allclose(confidence_scores(logits, y),
                          torch.tensor([math.log(0.7 / 0.3), math.log(0.05 / 0.95)], dtype=torch.float64))
    # Song & Mittal 2021: Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    first = -(0.3 * math.log(0.7)) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    second = -(0.95 * math.log(0.05)) - 0.05 * math.log(0.95) - 0.9 * math.log(0.1)
    assert torch.allclose(modified_entropy_scores(logits, y),
                          -torch.tensor([first, second], dtype=torch.float64))


@pytest.mark.parametrize("statistic", [loss_scores, confidence_scores])
def test_loss_and_confidence_keep_the_order_of_examples_past_float64_saturation(statistic):
    # true-class margins 40, 45 and 60: cross-entropy and p_y round to exactly 0 and 1 in float64
    logits = torch.tensor([[40.0, 0.0], [45.0, 0.0], [60.0, 0.0]], dtype=torch.float64)
    scores = statistic(logits, torch.tensor([0, 0, 0]))
    assert bool((scores[1:] > scores[:-1]).all()), scores
    # so two members at 45 and 60 rank above a non-member at 40
    result = membership_result("saturated", scores[1:], scores[:1])
    assert result.auc == 1.0


@pytest.mark.parametrize("margin", [5.0, 30.0, 37.0, 38.0, 40.0, 60.0])
def test_modified_entropy_is_exact_where_the_probability_rounds_to_one(margin):
    # 10 classes, the true logit ahead of nine equal others by ``margin``; in closed form
    # p_o = 1 / (e^m + 9) for each other class, 1 - p_y = 9 p_o and -log p_y = log(1 + 9 e^-m)
    logits = torch.zeros(1, 10, dtype=torch.float64)
    logits[0, 3] = margin
    p_other = 1.0 / (math.exp(margin) + 9.0)
    exact = 9.0 * p_other * math.log1p(9.0 * math.exp(-margin)) + 9.0 * p_other * -math.log1p(-p_other)
    score = modified_entropy_scores(logits, torch.tensor([3]))
    assert score.item() == pytest.approx(-exact, rel=1e-12, abs=0.0)  # the values are tiny


@pytest.mark.parametrize("margin", [5.0, 30.0, 37.0, 40.0, 100.0, 600.0])
def test_modified_entropy_is_exact_where_a_wrong_class_takes_almost_all_the_probability(margin):
    # 3 classes, true class 0, the wrong class 1 ahead of the other two by ``margin``; with e = e^-m
    # and Z = 1 + 2e: p_0 = p_2 = e / Z, p_1 = 1 / Z, so 1 - p_1 = 2e / Z never reaches 0 and Mentr
    # stays finite (about 2m - log 2), where log(1 - p_1) from a p_1 rounded to 1 would be -inf
    logits = torch.tensor([[0.0, margin, 0.0]], dtype=torch.float64)
    e = math.exp(-margin)
    z = 1.0 + 2.0 * e
    exact = ((1.0 + e) / z * (margin + math.log1p(2.0 * e))  # -(1 - p_0) log p_0
             + (margin - math.log(2.0) + math.log1p(2.0 * e)) / z  # -p_1 log(1 - p_1)
             - e / z * math.log1p(-e / z))  # -p_2 log(1 - p_2)
    score = modified_entropy_scores(logits, torch.tensor([0]))
    assert score.item() == pytest.approx(-exact, rel=1e-12)


def test_confidently_wrong_examples_keep_their_order_under_modified_entropy():
    # margins 40 and 100 on a wrong class: both finite, the surer mistake the less member-like
    logits = torch.tensor([[0.0, 40.0, 0.0], [0.0, 100.0, 0.0]], dtype=torch.float64)
    scores = modified_entropy_scores(logits, torch.tensor([0, 0]))
    assert bool(torch.isfinite(scores).all()) and scores[0] > scores[1], scores
    assert membership_result("wrong", scores[:1], scores[1:]).auc == 1.0


def test_logit_confidence_is_exact_where_the_probability_rounds_to_one():
    logits = torch.tensor([[math.log(9.0), 0.0], [40.0, 0.0]], dtype=torch.float32)
    phi = logit_confidence(logits, torch.tensor([0, 0]))
    assert phi[0].item() == pytest.approx(math.log(9.0))  # p = 0.9: log(0.9 / 0.1)
    assert phi[1].item() == pytest.approx(40.0)  # float32 softmax would give p = 1 and phi = inf


def test_lira_scores_are_the_gaussian_likelihood_ratio():
    # Prepare: 4 reference models; models 0, 1 trained on the example, 2, 3 did not
    reference = torch.tensor([[1.0], [3.0], [-1.0], [-3.0]], dtype=torch.float64)
    in_mask = torch.tensor([[True], [True], [False], [False]])
    target = torch.tensor([0.5], dtype=torch.float64)
    # Execute
    online = lira_scores(target, reference, in_mask, online=True, global_variance=False)
    offline = lira_scores(target, reference, in_mask, online=False, global_variance=False)
    # Assert: IN ~ N(2, 2), OUT ~ N(-2, 2) with the unbiased variance of two observations
    sd = math.sqrt(2.0)
    expected = norm.logpdf(0.5, 2, sd) - norm.logpdf(0.5, -2, sd)
    assert online.item() == pytest.approx(expected)
    assert online.item() == pytest.approx(1.0)  # ((0.5 + 2)^2 - (0.5 - 2)^2) / (2 * 2)
    assert offline.item() == pytest.approx(-math.log(-norm.logcdf(0.5, -2, sd)))  # -log(-log P)


def _exact_offline_score(z_per_query: list[float]) -> float:
    """-log(-sum of log Phi(z)) in 60-digit arithmetic, where float64's log Phi rounds to 0."""
    mpmath.mp.dps = 60
    tails = [mpmath.erfc(mpmath.mpf(z) / mpmath.sqrt(2)) / 2 for z in z_per_query]
    return float(-mpmath.log(-sum(mpmath.log1p(-q) for q in tails)))


def test_offline_lira_ranks_targets_far_above_out_without_ties():
    # Prepare: OUT models at phi = -1 and 1 (mean 0, std sqrt(2)); float32 targets 10 to 85 OUT stds
    # above, where float32's log Phi rounds to 0 from about 14 stds and float64's from about 38
    sd = math.sqrt(2.0)
    z = [10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 85.0]
    reference = torch.tensor([-1.0, 1.0])[:, None].expand(2, len(z))
    in_mask = torch.zeros(2, len(z), dtype=torch.bool)
    target = torch.tensor([sd * zi for zi in z])
    # Execute: one query, and two with the same Gaussians, as a view and its mirror could have
    one = lira_scores(target, reference, in_mask, online=False, global_variance=False)
    both = lira_scores(torch.stack([target, target], dim=-1), torch.stack([reference, reference], dim=-1),
                       in_mask, online=False, global_variance=False)
    # Assert: strictly increasing, and equal to the exact value of -log(-sum of log P)
    assert one.dtype == torch.float64
    assert bool((one.diff() > 0).all()) and bool((both.diff() > 0).all())
    for i, target_phi in enumerate(target.tolist()):
        exact_z = target_phi / sd  # the float32 target, as scored
        assert one[i].item() == pytest.approx(_exact_offline_score([exact_z]), rel=1e-12)
        assert both[i].item() == pytest.approx(_exact_offline_score([exact_z, exact_z]), rel=1e-12)


def test_global_variance_pools_the_spread_around_each_examples_mean():
    reference = torch.tensor([[1.0, 10.0], [3.0, 14.0], [-1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    in_mask = torch.tensor([[True, True], [True, True], [False, False], [False, False]])
    target = torch.tensor([2.0, 12.0], dtype=torch.float64)
    online = lira_scores(target, reference, in_mask, online=True, global_variance=True)
    # IN residuals: (+-1) and (+-2): pooled variance (1 + 1 + 4 + 4) / 2 = 5;
    # OUT: (+-1) and 0: (1 + 1) / 2 = 1
    expected = [norm.logpdf(2, 2, math.sqrt(5)) - norm.logpdf(2, -2, 1),
                norm.logpdf(12, 12, math.sqrt(5)) - norm.logpdf(12, 0, 1)]
    assert online.tolist() == pytest.approx(expected)


def test_half_assignment_puts_every_example_in_exactly_half_the_models():
    keep = half_assignment(8, 500, torch.Generator().manual_seed(0))
    assert (keep.sum(dim=0) == 4).all()
    assert keep.sum(dim=1).float().sub(250).abs().max() < 50  # each model gets about half
    single = half_assignment(1, 501, torch.Generator().manual_seed(0))
    assert int(single.sum()) == 250


# -- exact duplicates ------------------------------------------------------------------------------

def test_shared_rows_finds_exact_duplicates_only():
    a = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    others = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    b = torch.cat([a[[7, 2]], a[5:6] + 1e-7, others])
    pairs = shared_rows(a, b)
    assert sorted(map(tuple, pairs.tolist())) == [(2, 1), (7, 0)]


def test_check_member_sets_names_a_duplicate_pair():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(12, 3, generator=gen)
    members = Split(x[:6], torch.zeros(6, dtype=torch.long))
    non_members = Split(torch.cat([x[10:12], x[4:5]]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="1 input.*member 4 equals non-member 2"):
        check_member_sets(members, non_members)


def test_locate_matches_input_and_label():
    pool = Split(torch.eye(4), torch.tensor([0, 1, 2, 3]))
    query = Split(torch.eye(4)[[2, 1, 3]], torch.tensor([2, 1, 0]))  # the last has another label
    assert locate(pool, query).tolist() == [2, 1, -1]


def test_bad_splits_are_refused_with_their_problem():
    good = Split(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    nan = Split(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))
    float_labels = Split(torch.rand(4, 3), torch.zeros(4))
    with pytest.raises(DataError, match="non-members: inputs contain 12 NaN"):
        check_member_sets(good, nan)
    with pytest.raises(DataError, match="labels must be integer"):
        check_member_sets(float_labels, good)
    assert membership_result("x", torch.tensor([np.inf]), torch.tensor([0.0])).auc == 1.0


def test_the_strongest_attack_is_the_one_with_the_highest_auc_as_the_report_names():
    # Prepare: one attack ranks first by AUC, the other by TPR at the lowest FPR
    from fortify.privacy.audit import PrivacyReport
    from fortify.privacy.metrics import MembershipResult

    def result(name, auc, tpr):
        return MembershipResult(name, {}, 100, 100, auc, 0.5, 0.0, 0.0, {"0.01": tpr, "0.1": 0.5})

    broad, sharp = result("broad", 0.70, 0.02), result("sharp", 0.60, 0.20)
    tied = result("tied", 0.70, 0.05)
    # Execute / Assert
    assert PrivacyReport(100, 100, membership=[sharp, broad]).strongest() is broad
    assert PrivacyReport(100, 100, membership=[broad, tied, sharp]).strongest() is tied  # TPR breaks ties
