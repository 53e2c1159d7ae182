"""The report's per-model analysis: margins, certificates and gallery checked against geometry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fortify.attacks import FGSM, PGD
from fortify.errors import ConfigError, ThreatModelViolation
from fortify.evaluation import evaluate
from fortify.evaluation.analysis import AnalysisOptions, analyse
from fortify.evaluation.certify import certify
from fortify.evaluation.metrics import robustness_score
from fortify.threat import ThreatModel
from gradient_free import DetachedInput

FEATURES = 10


def _linear_two_class() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 2)
    with torch.no_grad():
        model.bias.copy_(-model.weight.sum(1) / 2)  # the boundary passes through the box's centre
    return model


def _distance_to_boundary(model: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    return (x @ w + b).abs() / w.norm()


def _analyse(model, x, y, threat, num_classes, **options):
    attacks = [FGSM(threat), PGD(threat, steps=10, seed=0)]
    report = evaluate(model, x, y, attacks, threat, eps_grid=[threat.eps / 2, threat.eps],
                      num_classes=num_classes)
    return analyse(model, x, y, threat, attack=attacks[1], report=report, num_classes=num_classes,
                   options=AnalysisOptions(**options)), report


def test_linear_model_margins_match_the_geometry_and_certificates_stay_below_them():
    # Prepare: points near the centre of the box, labelled by the model itself (all clean-correct)
    model = _linear_two_class()
    x = 0.5 + 0.1 * torch.randn(40, FEATURES, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()
    threat = ThreatModel("linf", 0.05)
    # Execute
    analysis, _ = _analyse(model, x, y, threat, 2, margin_examples=40, certify_examples=40,
                           certify_n=2000, certify_sigma=0.1, masking_examples=40, margin_steps=200)
    # Assert: FMN's L2 margin is the exact distance to the hyperplane (the box is not binding here)
    exact = _distance_to_boundary(model, x)
    margin = torch.tensor(analysis.certified["l2_margin"])
    torch.testing.assert_close(margin, exact, rtol=2e-2, atol=1e-3)
    # the certificate is a lower bound on the smoothed (here: the same) classifier's distance
    radii = torch.tensor(analysis.certified["radii"])
    assert bool((radii <= exact + 1e-6).all())
    assert analysis.certified["above_margin"] == []
    assert (radii > 0).sum() >= 20
    # the linf margin of a linear model is |w.x + b| / ||w||_1
    w = (model.weight[1] - model.weight[0]).detach()
    linf_exact = exact * w.norm() / w.abs().sum()
    torch.testing.assert_close(torch.tensor(analysis.margin["distances"]), linf_exact, rtol=3e-2, atol=1e-3)


def test_a_certificate_of_the_wrong_class_counts_as_radius_zero():
    # Prepare: points the linear model classifies confidently; half of them labelled otherwise
    model = _linear_two_class()
    w = (model.weight[1] - model.weight[0]).detach()
    side = torch.tensor([1.0, -1.0] * 10)[:, None]
    x = (0.5 + side * 0.3 * w / w.norm()).clamp(0, 1)
    predicted = model(x).argmax(1).detach()
    y = torch.where(torch.arange(20) % 4 == 0, 1 - predicted, predicted)
    threat = ThreatModel("linf", 0.05)
    # Execute
    analysis, _ = _analyse(model, x, y, threat, 2, margin_examples=20, certify_examples=20, certify_n=500,
                           certify_sigma=0.1, masking_examples=20, margin_steps=50)
    # Assert: the smoothed model certifies its own class everywhere, which is wrong for the flipped
    # labels: those count as radius 0, the others keep their positive radius
    radii = torch.tensor(analysis.certified["radii"])
    flipped = y != predicted
    assert bool((radii[flipped] == 0).all()) and bool((radii[~flipped] > 0).all())


@pytest.mark.parametrize("sigma", [0.1, 0.25])
def test_the_certified_curve_ends_at_the_share_certified_at_the_largest_radius(sigma):
    # Prepare: a model right on every noisy copy, so every example is certified at the same radius,
    # the cap sigma * Phi^-1(alpha^(1/n)); in float32 that radius rounds up at sigma 0.1 (down at 0.25)
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([5.0, -5.0]))
    x = torch.rand(10, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(10, dtype=torch.long)
    # Execute
    analysis, _ = _analyse(model, x, y, ThreatModel("linf", 0.1), 2, margin_examples=10, certify_examples=10,
                           certify_sigma=sigma, certify_n=1000, masking_examples=10, margin_steps=10)
    # Assert: certified accuracy at r counts radius >= r, so the curve stays at 1 up to its last point
    curve = analysis.certified["curve"]
    assert len(set(analysis.certified["radii"])) == 1
    assert curve["radii"][-1] == analysis.certified["radii"][0]
    assert curve["accuracy"] == [1.0] * 11


def test_the_certified_section_runs_in_a_box_whose_l2_diameter_is_below_one():
    # Prepare: two features in [0, 0.5] (L2 diameter 0.71), where an L2 ball of radius 1 is refused
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias.copy_(-model.weight.sum(1) / 4)  # the boundary through the box's centre
    x = 0.25 + 0.05 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    x = x.clamp(0, 0.5)
    y = model(x).argmax(1).detach()
    threat = ThreatModel("linf", 0.02, (0.0, 0.5))
    # Execute
    analysis, _ = _analyse(model, x, y, threat, 2, margin_examples=8, certify_examples=8, certify_n=200,
                           certify_sigma=0.05, masking_examples=8, margin_steps=100)
    # Assert: FMN's L2 margins are the distances to the hyperplane
    exact = _distance_to_boundary(model, x)
    torch.testing.assert_close(torch.tensor(analysis.certified["l2_margin"]), exact, rtol=2e-2, atol=1e-3)


def test_digits_analysis_is_consistent_with_the_evaluation(digits, standard_model):
    # Prepare
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:120], digits.test.y[:120]
    # Execute
    analysis, report = _analyse(standard_model, x, y, threat, 10, margin_examples=120,
                                certify_examples=30, certify_n=200, masking_examples=60,
                                margin_steps=50, gallery_examples=5)
    # Assert: the margin is 0 exactly on the examples misclassified clean, positive elsewhere
    distances = torch.tensor([float("inf") if d is None else d for d in analysis.margin["distances"]])
    wrong = ~torch.tensor(report.clean_correct)
    assert torch.equal(distances == 0, wrong)
    summary = analysis.margin["summary"]
    assert summary["n_examples"] == 120
    # the fraction broken within eps bounds the measured robust accuracy from the other side only
    # when FMN is at least as strong as PGD; it must at least break the clean errors
    assert summary["fraction_below"][0] >= float(wrong.float().mean())
    # metrics under the attack: robust <= clean, and the gallery shows only fooled examples in the ball
    attack = analysis.metrics["attack"]
    assert attack["adversarial_accuracy"] <= attack["clean_accuracy"]
    # the analysis attacks at the evaluation's points: its PGD accuracy is the PGD row's, exactly
    pgd_row = next(result for result in report.attacks if result.name == analysis.attack)
    assert attack["adversarial_accuracy"] == pytest.approx(pgd_row.adversarial_accuracy, abs=1e-9)
    expected = robustness_score(report.clean_accuracy, report.worst_case_accuracy,
                                eps=[p.eps for p in report.eps_curve],
                                eps_accuracy=[p.accuracy for p in report.eps_curve])
    assert analysis.score == expected.to_dict() and analysis.score["eps_auc"] is not None
    # the share broken within 0.25, 0.5, 1, 1.5 and 2 eps, from the distances themselves
    assert summary["eps"] == pytest.approx([threat.eps * f for f in (0.25, 0.5, 1.0, 1.5, 2.0)])
    assert summary["fraction_below"] == pytest.approx(
        [float((distances <= e + 1e-12).float().mean()) for e in summary["eps"]])
    gallery = analysis.gallery["examples"]
    assert 0 < len(gallery) <= 5
    for example in gallery:
        clean, adversarial = torch.tensor(example["clean"]), torch.tensor(example["adversarial"])
        assert example["adversarial_prediction"] != example["label"] == example["clean_prediction"]
        assert float((adversarial - clean).abs().max()) <= threat.eps + 2e-3  # stored rounded to 1e-3
        assert adversarial.min() >= 0 and adversarial.max() <= 1
    # certificates: radius 0 wherever the smoothed class is wrong or abstains (the same certificate,
    # recomputed with the analysis's seed); flags match the data
    radii, margin = analysis.certified["radii"], analysis.certified["l2_margin"]
    options = AnalysisOptions()
    again = certify(standard_model, x[:30], sigma=options.certify_sigma, n=200, alpha=options.certify_alpha,
                    num_classes=10, seed=options.seed)
    right = again.predictions == y[:30]
    assert torch.equal(torch.tensor(radii) > 0, right & (again.radii > 0))
    assert int((~right).sum()) > 0  # the claim is tested on some wrong or abstained example
    flagged = [i for i, (r, m) in enumerate(zip(radii, margin)) if m is not None and r > m + 1e-6]
    assert analysis.certified["above_margin"] == flagged
    assert analysis.masking["n_examples"] == 60
    json.dumps(analysis.to_dict(), allow_nan=False)  # standard JSON: inf and NaN became null


@pytest.mark.parametrize("options", [{"margin_examples": 0}, {"certify_sigma": -1.0},
                                     {"certify_alpha": 1.5}, {"gallery_examples": -1},
                                     {"gallery_examples": 2.5}, {"seed": 1.5}, {"margin_examples": True},
                                     # a flag or text passed here and failed in certify after the attacks
                                     {"certify_sigma": True}, {"certify_sigma": "0.5"},
                                     {"certify_alpha": None}])
def test_bad_options_are_rejected(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        AnalysisOptions(**options)


def test_counts_given_as_whole_floats_are_stored_as_ints():
    # a float count used to pass the check and fail as a slice bound after the attacks had run
    options = AnalysisOptions(margin_examples=2.0, gallery_examples=3.0, masking_examples=4.0, seed=7.0)
    counts = (options.margin_examples, options.gallery_examples, options.masking_examples, options.seed)
    assert counts == (2, 3, 4, 7) and all(type(v) is int for v in counts)


def test_a_report_of_another_model_is_refused(digits, standard_model):
    # Prepare: the report of a model that gets other examples right than the one analysed
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:40], digits.test.y[:40]
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    report = evaluate(other, x, y, [FGSM(threat)], threat, eps_grid=[])
    options = AnalysisOptions(margin_examples=2, margin_steps=5, certify_examples=2, certify_n=10,
                              masking_examples=4)
    # Execute / Assert: refused before any attack; its score would have come from the other model
    with pytest.raises(ConfigError, match="not of this model"):
        analyse(standard_model, x, y, threat, attack=FGSM(threat), report=report, num_classes=10,
                options=options)
    # two flipped examples, as a mixed-precision evaluation may flip, pass
    own = evaluate(standard_model, x, y, [FGSM(threat)], threat, eps_grid=[])
    own.clean_correct = [not c if i < 2 else c for i, c in enumerate(own.clean_correct)]
    analyse(standard_model, x, y, threat, attack=FGSM(threat), report=own, num_classes=10, options=options)


def test_a_model_without_an_input_gradient_gets_its_analysis(digits, standard_model):
    # evaluate and the masking verdict took such a model; the analysis failed inside autograd
    threat = ThreatModel("linf", 0.1)
    model = DetachedInput(standard_model)
    x, y = digits.test.x[:24], digits.test.y[:24]
    analysis, report = _analyse(model, x, y, threat, 10, margin_examples=4, margin_steps=5,
                                certify_examples=4, certify_n=20, masking_examples=24)
    # the attacks stall on zero gradients (PGD's random start may still fool a few)
    assert analysis.metrics["attack"]["adversarial_accuracy"] >= report.clean_accuracy - 0.2
    assert analysis.masking["masked"] is True
    assert "zero_gradients" in [c["name"] for c in analysis.masking["checks"] if not c["passed"]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_give_the_int64_analysis(digits, standard_model, dtype):
    # they passed the label check, then failed in torch's cross-entropy and gather
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:24], digits.test.y[:24]
    options = {"margin_examples": 4, "margin_steps": 5, "certify_examples": 4, "certify_n": 20,
               "masking_examples": 24}
    narrow, _ = _analyse(standard_model, x, y.to(dtype), threat, 10, **options)
    wide, _ = _analyse(standard_model, x, y, threat, 10, **options)
    for section in ("metrics", "score", "margin", "certified"):
        assert getattr(narrow, section) == getattr(wide, section), section
    assert narrow.masking["masked"] == wide.masking["masked"]


def test_the_attack_the_report_and_the_class_count_must_fit_the_analysis(digits, standard_model):
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:32], digits.test.y[:32]
    report = evaluate(standard_model, x, y, [FGSM(threat)], threat, eps_grid=[])
    options = AnalysisOptions(margin_examples=4, margin_steps=5, certify_examples=4, certify_n=20,
                              masking_examples=32)
    with pytest.raises(ConfigError, match="uses l2 eps=3"):
        analyse(standard_model, x, y, threat, attack=PGD(ThreatModel("l2", 3.0)), report=report,
                num_classes=10, options=options)
    with pytest.raises(ConfigError, match="the robustness report was measured at linf eps=0.1"):
        analyse(standard_model, x, y, ThreatModel("linf", 0.2), attack=FGSM(ThreatModel("linf", 0.2)),
                report=report, num_classes=10, options=options)
    wide = ThreatModel("linf", 0.1, bounds=(0.0, 2.0))
    with pytest.raises(ConfigError, match=r"box=\[0.0, 1.0\], the analysis asks for linf eps=0.1 box=\[0, 2"):
        analyse(standard_model, x, y, wide, attack=FGSM(wide), report=report, num_classes=10, options=options)
    with pytest.raises(ConfigError, match="measured on 32 examples, the analysis is given 16"):
        analyse(standard_model, x[:16], y[:16], threat, attack=FGSM(threat), report=report, num_classes=10,
                options=options)
    with pytest.raises(ConfigError, match="num_classes=12 but the model scores 10 classes"):
        analyse(standard_model, x, y, threat, attack=FGSM(threat), report=report, num_classes=12,
                options=options)


class _Outside(FGSM):
    """FGSM that steps twice as far as its threat model allows."""

    def perturb(self, model, x, y, target, generator):
        return (x + 2 * (super().perturb(model, x, y, target, generator) - x)).clamp(0, 1)


def test_an_attack_that_leaves_the_ball_is_a_threat_model_violation(digits, standard_model):
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:16], digits.test.y[:16]
    report = evaluate(standard_model, x, y, [FGSM(threat)], threat, eps_grid=[])
    with pytest.raises(ThreatModelViolation, match="outside linf eps=0.1"):
        analyse(standard_model, x, y, threat, attack=_Outside(threat), report=report, num_classes=10,
                options=AnalysisOptions(margin_examples=2, certify_examples=2, certify_n=10,
                                        masking_examples=4))


def test_a_model_right_on_no_example_gets_an_analysis_with_masking_not_judged(digits, standard_model):
    # Prepare: labels the model never predicts, so nothing is classified correctly
    threat = ThreatModel("linf", 0.1)
    x = digits.test.x[:24]
    with torch.no_grad():
        y = (standard_model(x).argmax(1) + 1) % 10
    # Execute
    analysis, report = _analyse(standard_model, x, y, threat, 10, margin_examples=8, margin_steps=10,
                                certify_examples=4, certify_n=20, masking_examples=12)
    # Assert: everything else measured; the masking verdict says it could not judge, and why
    assert report.clean_accuracy == 0.0 and analysis.metrics["attack"]["clean_accuracy"] == 0.0
    assert analysis.margin["summary"]["n_examples"] == 8
    masking = analysis.masking
    assert masking["masked"] is None and masking["checks"] == [] and masking["n_attacked"] == 0
    assert masking["n_examples"] == 12 and "none of these 12 examples" in masking["notes"][0]
    json.dumps(analysis.to_dict(), allow_nan=False)


@pytest.mark.parametrize("batch_size", [32, 256])
def test_the_analysis_attacks_at_the_points_of_the_evaluations_attack(digits, batch_size):
    # Prepare: a linear model that PGD-5 at eps 0.06 fools only in part, so that other random
    # starts or batches would fool other examples (the analysis once attacked every example with one
    # generator, and its accuracy came out above the report's worst case)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(digits.train.x), digits.train.y).backward()
        optimizer.step()
    x, y = digits.test.x[:200], digits.test.y[:200]
    threat = ThreatModel("linf", 0.06)
    attack = PGD(threat, steps=5)
    report = evaluate(model.eval(), x, y, [attack], threat, batch_size=batch_size, eps_grid=[])
    options = AnalysisOptions(margin_examples=2, margin_steps=5, certify_examples=2, certify_n=50,
                              masking_examples=2, gallery_examples=0, batch_size=batch_size)
    # Execute
    analysis = analyse(model, x, y, threat, attack=attack, report=report, num_classes=10, options=options)
    # Assert: the same examples fooled
    row = report.attacks[0]
    assert 0 < row.success_rate < 1
    assert analysis.metrics["attack"]["adversarial_accuracy"] == pytest.approx(row.adversarial_accuracy,
                                                                               abs=1e-9)
