"""Membership inference on deliberately overfit digit MLPs: positive and negative controls, bad input.

Each zoo model trained on a random half of a 200-digit pool; with every model as the target in
turn and the other 8 as LiRA's reference models, the pooled scores cover about 800 members and 1000
non-members, enough to resolve TPR at 1% FPR (Carlini et al. 2022 evaluate the same way).
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fortify.config import TrainConfig
from fortify.data import Dataset, Split
from fortify.errors import ConfigError, DataError
from fortify.privacy import (
    PrivacyReport,
    ReferenceModels,
    audit,
    audit_trained_model,
    augmentation_attack,
    augmentation_scores,
    boundary_distance_attack,
    hopskipjump_boundary_distance,
    lira_attack,
    lira_member_scores,
    membership_result,
    membership_scores,
    pgd_boundary_distance,
    random_direction_distance,
    remove_overlap,
    shadow_attack,
    threshold_attack,
    train_reference_models,
)
from fortify.threat import ThreatModel

pytestmark = pytest.mark.slow  # the zoo fixture trains 9 models (about 10 s on 2 cores)


def _pooled(zoo, score_fn):
    """Scores of every zoo model as the target on its own members and non-members, pooled."""
    inside, outside = [], []
    for index in range(len(zoo.models.models)):
        model, _, _, references = zoo.target(index)
        scores = score_fn(model, references)
        keep = zoo.models.keep[index]
        inside.append(scores[keep])
        outside.append(scores[~keep])
    return torch.cat(inside), torch.cat(outside)


def test_overfit_model_leaks_membership_through_its_loss(zoo):
    # Prepare: one zoo model, its members, and non-members it never saw
    model, members, pool_outsiders, _ = zoo.target(0)
    non_members = Split(torch.cat([pool_outsiders.x, zoo.unseen.x[:600]]),
                        torch.cat([pool_outsiders.y, zoo.unseen.y[:600]]))
    # Execute
    results = {s: threshold_attack(model, members, non_members, statistic=s)
               for s in ("loss", "confidence", "modified-entropy")}
    # Assert: better than guessing (one model, 90 members: the AUC's standard error is about 0.03;
    # the pooled test below holds the 0.6 bar); the loss orders examples as the confidence does
    assert results["loss"].auc > 0.56
    assert results["modified-entropy"].auc > 0.56
    assert results["confidence"].auc == pytest.approx(results["loss"].auc, abs=1e-9)
    assert results["loss"].tpr_at_fpr.keys() == {"0.01"}  # 711 non-members cannot resolve 0.1%
    assert any("0.001" in note and "1000" in note for note in results["loss"].notes)


def test_lira_beats_the_loss_threshold_at_low_fpr(zoo):
    # Execute: pooled over all 9 targets
    fprs = (0.001, 0.01)
    loss = membership_result("loss", *_pooled(zoo, lambda m, r: membership_scores(m, zoo.pool)),
                             fprs=fprs)
    online = membership_result("lira-online", *_pooled(
        zoo, lambda m, r: lira_member_scores(m, zoo.pool, r, online=True)), fprs=fprs)
    offline = membership_result("lira-offline", *_pooled(
        zoo, lambda m, r: lira_member_scores(m, zoo.pool, r, online=False)), fprs=fprs)
    # Assert: LiRA finds several times more members at low FPR (a guess finds as many as the FPR)
    assert (loss.n_members, loss.n_nonmembers) == (800, 1000)  # each digit is in 4 of the 9 models
    assert loss.auc > 0.6
    assert online.tpr_at_fpr["0.01"] > 2 * loss.tpr_at_fpr["0.01"]
    assert online.tpr_at_fpr["0.01"] > 0.04
    assert online.tpr_at_fpr["0.001"] > 5 * max(loss.tpr_at_fpr["0.001"], 0.001)
    assert offline.tpr_at_fpr["0.01"] > loss.tpr_at_fpr["0.01"]
    assert online.auc > loss.auc


def test_lira_attack_on_one_target_reports_its_settings(zoo):
    model, members, non_members, references = zoo.target(1)
    result = lira_attack(model, members, non_members, references, online=True)
    assert result.attack == "lira-online"
    assert result.settings["n_reference_models"] == 8
    assert result.settings["variance"] == "global"  # auto: fewer than 64 reference models
    assert result.settings["queries"]["n_queries"] == 1  # by default the example alone
    assert result.n_members + result.n_nonmembers == len(zoo.pool)
    assert result.auc > 0.6


def test_examples_the_model_never_saw_look_like_non_members(zoo):
    # Prepare: "members" that are not members; 1597 unseen digits split in halves
    model, _, _, references = zoo.target(0)
    half = len(zoo.unseen) // 2
    fake_members = Split(zoo.unseen.x[:half], zoo.unseen.y[:half])
    non_members = Split(zoo.unseen.x[half:], zoo.unseen.y[half:])
    # Execute
    results = [threshold_attack(model, fake_members, non_members, statistic=s)
               for s in ("loss", "modified-entropy")]
    results.append(lira_attack(model, fake_members, non_members, references, online=False))
    # Assert: no attack tells them apart (the standard error of the AUC here is about 0.015)
    for result in results:
        assert result.auc == pytest.approx(0.5, abs=0.05), result.attack


def test_shadow_models_trained_by_the_targets_recipe_infer_membership(zoo):
    model, members, _, _ = zoo.target(0)
    non_members = zoo.unseen.head(300)
    shadow_pool = Split(zoo.unseen.x[300:700], zoo.unseen.y[300:700])
    result = shadow_attack(model, members, non_members, shadow_pool=shadow_pool, recipe=zoo.recipe,
                           n_shadows=2, seed=3)
    assert result.auc > 0.55
    assert result.settings["n_shadows"] == 2
    assert result.settings["shadow_pool_overlap"] == 0
    assert not any("shadow pool" in note for note in result.notes), result.notes


def test_a_shadow_pool_that_shares_the_targets_examples_is_noted(zoo):
    # Prepare: an attacker pool holding 30 of the members and 20 of the non-members it will score
    model, members, _, _ = zoo.target(0)
    non_members = zoo.unseen.head(100)
    shadow_pool = Split(torch.cat([members.x[:30], non_members.x[:20], zoo.unseen.x[300:400]]),
                        torch.cat([members.y[:30], non_members.y[:20], zoo.unseen.y[300:400]]))
    # Execute
    result = shadow_attack(model, members, non_members, shadow_pool=shadow_pool, recipe=zoo.recipe,
                           n_shadows=1, seed=3)
    # Assert
    assert result.settings["shadow_pool_overlap"] == 50
    assert any("50 of the shadow pool's 150 inputs" in note for note in result.notes), result.notes


def test_label_only_attacks_infer_membership_from_robustness(zoo):
    # Prepare: three targets, pooled (about 270 members and 330 non-members)
    targets = [zoo.target(i) for i in range(3)]

    def pooled(score):
        inside = torch.cat([score(m, members) for m, members, _, _ in targets])
        outside = torch.cat([score(m, non_members) for m, _, non_members, _ in targets])
        return membership_result("pooled", inside, outside)

    # Execute
    augmentation = pooled(lambda m, s: augmentation_scores(m, s, max_shift=1, noise_std=0.2,
                                                           noise_copies=16))
    pgd_distance = pooled(lambda m, s: pgd_boundary_distance(m, s.x, s.y))
    random_distance = pooled(lambda m, s: random_direction_distance(m, s.x, s.y))
    hsj_distance = pooled(lambda m, s: hopskipjump_boundary_distance(m, s.x, s.y, max_queries=500))
    # Assert: measured 0.61 to 0.63; a blind attack would sit at 0.5 +- 0.023
    for result in (augmentation, pgd_distance, random_distance, hsj_distance):
        assert result.auc > 0.56


def test_label_only_attack_functions_report_their_settings(zoo):
    model, members, _, _ = zoo.target(0)
    non_members = zoo.unseen.head(300)
    augmentation = augmentation_attack(model, members, non_members, max_shift=1, noise_std=0.2,
                                       noise_copies=16)
    boundary = boundary_distance_attack(model, members, non_members)
    assert augmentation.auc > 0.55 and boundary.auc > 0.55
    assert augmentation.settings["noise_copies"] == 16
    assert boundary.settings["distance_fn"] == "hopskipjump_boundary_distance"


def test_boundary_distance_accepts_any_distance_function(zoo):
    # a distance that is the true label's margin: a stand-in for a minimum-norm attack
    def margin(model, x, y):
        logits = model(x)
        own = logits.gather(1, y.unsqueeze(1)).squeeze(1)
        other = logits.scatter(1, y.unsqueeze(1), -torch.inf).amax(1)
        return (own - other).clamp_min(0).detach()

    model, members, non_members, _ = zoo.target(0)
    result = boundary_distance_attack(model, members, non_members, distance_fn=margin)
    assert result.settings["distance_fn"] == "margin"
    assert result.auc > 0.55


def test_audit_runs_the_attacks_and_its_report_round_trips_through_json(zoo):
    model, members, non_members, _ = zoo.target(2)
    report = audit(model, members, non_members, attacks=("loss", "modified-entropy", "augmentation"))
    restored = PrivacyReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert [r.attack for r in report.membership] == [
        "threshold-loss", "threshold-modified-entropy", "label-only-augmentation"]
    assert restored.to_dict() == report.to_dict()
    assert report.strongest() is max(report.membership, key=lambda r: r.auc)
    assert any("0.001" in w for w in report.warnings)  # about 110 non-members: no TPR at 0.1%


def test_audit_of_a_trained_model_covers_membership_inversion_and_gradient_leakage(zoo):
    # Prepare: a dataset whose test split repeats one training digit
    model, members, non_members, _ = zoo.target(3)
    test = Split(torch.cat([non_members.x, members.x[:1]]), torch.cat([non_members.y, members.y[:1]]))
    dataset = Dataset("zoo", members, zoo.unseen.head(32), test, num_classes=10)
    # Execute
    report = audit_trained_model(model, dataset, leakage_batch_sizes=(1,), leakage_steps=50)
    # Assert
    assert [r.attack for r in report.membership][:1] == ["threshold-loss"]
    assert report.n_nonmembers == len(non_members)  # the repeated digit was left out
    assert "1 test input(s) also occur in the training split" in report.warnings[-1]
    assert report.inversion is not None and len(report.inversion.classes) == 10
    assert [r.noise_multiplier for r in report.reconstruction] == [0.0, 0.01, 0.1]
    assert PrivacyReport.from_dict(json.loads(json.dumps(report.to_dict()))).to_dict() == report.to_dict()


def test_a_test_input_seen_in_training_past_n_examples_is_no_non_member(zoo):
    # Prepare: the test split opens with the last training digit, far past the 20 members scored
    model, members, non_members, _ = zoo.target(3)
    test = Split(torch.cat([members.x[-1:], non_members.x]), torch.cat([members.y[-1:], non_members.y]))
    dataset = Dataset("zoo", members, zoo.unseen.head(32), test, num_classes=10)
    # Execute
    report = audit_trained_model(model, dataset, n_examples=20, inversion=False)
    # Assert: the model trained on it, so it is left out of the non-members, with the warning
    assert report.n_nonmembers == 20
    assert "1 test input(s) also occur in the training split" in report.warnings[-1]


def test_inputs_of_the_extra_data_are_neither_members_nor_non_members(zoo):
    # Prepare: extra data the model trained on besides its training split, holding two members, three
    # test inputs and digits of neither
    model, members, non_members, _ = zoo.target(3)
    dataset = Dataset("zoo", members, zoo.unseen.head(32), non_members, num_classes=10)
    picked = [members.head(2), Split(non_members.x[5:8], non_members.y[5:8]),
              Split(zoo.unseen.x[-4:], zoo.unseen.y[-4:])]
    extra = Split(torch.cat([s.x for s in picked]), torch.cat([s.y for s in picked]))
    # Execute
    report = audit_trained_model(model, dataset, inversion=False, extra_data=extra)
    plain = audit_trained_model(model, dataset, inversion=False)
    # Assert: a test input the model trained on as extra data is no non-member; the members in it go
    # too, since no LiRA reference model could leave them out
    assert (report.n_members, report.n_nonmembers) == (len(members) - 2, len(non_members) - 3)
    assert (plain.n_members, plain.n_nonmembers) == (len(members), len(non_members))
    assert "2 training and 3 test input(s) also occur in train.extra_data" in report.warnings[-1]
    assert not any("extra_data" in w for w in plain.warnings)


# -- bad input -----------------------------------------------------------------------------------

def _untrained_recipe(train: Split, *, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_reference_models_keep_copies_of_one_input_on_the_same_side():
    # Prepare: a pool whose input 0 occurs again as row 5, and a recipe that records what it trains on
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 10
    x[5], y[5] = x[0], y[0]
    seen: list[Tensor] = []

    def recording_recipe(train: Split, *, seed: int) -> nn.Module:
        seen.append(train.x.reshape(len(train), -1))
        return _untrained_recipe(train, seed=seed)

    # Execute
    references = train_reference_models(Split(x, y), recording_recipe, n_models=8, seed=3)
    # Assert: a model is IN for a row exactly when that input was in its training data
    rows = x.reshape(12, -1)
    trained_on = torch.stack([(rows[:, None] == data[None]).all(-1).any(-1) for data in seen])
    assert torch.equal(references.keep, trained_on)
    assert int(references.keep[:, 0].sum()) == 4  # still in for half of the models


def test_overlapping_members_and_non_members_are_refused(zoo):
    model, members, non_members, _ = zoo.target(0)
    leaky = Split(torch.cat([non_members.x, members.x[3:4]]), torch.cat([non_members.y, members.y[3:4]]))
    with pytest.raises(DataError, match=r"member 3 equals non-member"):
        threshold_attack(model, members, leaky)
    cleaned, dropped = remove_overlap(members, leaky)
    assert dropped == 1 and len(cleaned) == len(non_members)


def test_too_few_non_members_for_the_requested_fpr_is_refused(zoo):
    model, members, non_members, _ = zoo.target(0)
    with pytest.raises(DataError, match=r"needs at least 1000 non-members.*got 1\d\d"):
        threshold_attack(model, members, non_members, fprs=(0.001,))


@pytest.mark.parametrize("n_models", [3, 5])
def test_global_variance_lira_with_an_odd_number_of_models_prefers_targets_near_their_in_mean(n_models):
    # Prepare: reference phis with a within-example spread of 1 on both sides around example means
    # that differ by far more; the models that trained on an example sit 2 higher
    from fortify.privacy.lira import half_assignment, lira_scores

    generator = torch.Generator().manual_seed(0)
    keep = half_assignment(n_models, 400, generator)  # 3 models: 1 IN and 2 OUT per example
    difficulty = 4 * torch.randn(400, generator=generator, dtype=torch.float64)
    reference = difficulty + torch.randn(n_models, 400, generator=generator, dtype=torch.float64) + 2.0 * keep
    out_mean = (reference * ~keep).sum(0) / (~keep).sum(0)
    in_mean = (reference * keep).sum(0) / keep.sum(0)
    # Execute
    at_in = lira_scores(in_mean, reference, keep, online=True, global_variance=True)
    below_out = lira_scores(out_mean - 3.0, reference, keep, online=True, global_variance=True)
    # Assert: a target three OUT-stds below its OUT mean is no member next to one on its IN mean,
    # except where the noise put the IN value below the OUT mean (d = in - out in (-3, 0): about 5%)
    assert float((at_in > below_out).double().mean()) > 0.9
    assert float(below_out.median()) < 0 < float(at_in.median())


def test_online_lira_needs_two_reference_models(zoo):
    # Prepare: cheap untrained reference models are enough to reach the checks
    model, members, non_members, _ = zoo.target(0)
    one = train_reference_models(zoo.pool, _untrained_recipe, n_models=1)
    two = train_reference_models(zoo.pool, _untrained_recipe, n_models=2)
    # Execute / Assert
    with pytest.raises(ConfigError, match="at least 2 reference models.*got 1"):
        lira_attack(model, members, non_members, one, online=True)
    with pytest.raises(DataError, match="0 OUT reference models"):  # half the pool trained it
        lira_attack(model, members, non_members, one, online=False)
    offline = lira_attack(model, members, zoo.unseen.head(100), two, online=False)
    assert offline.settings["n_reference_models"] == 2  # offline: OUT models are enough
    with pytest.raises(DataError, match="variance needs at least 2"):
        lira_attack(model, members, non_members, two, online=True, variance="per-example")
    outsiders = zoo.unseen.head(50)
    with pytest.raises(DataError, match="50 of the .* not in the reference pool"):
        lira_attack(model, members, outsiders, two, online=True)


def test_unknown_names_list_the_valid_ones(zoo):
    model, members, non_members, _ = zoo.target(0)
    with pytest.raises(ConfigError, match="valid: loss, confidence, modified-entropy"):
        threshold_attack(model, members, non_members, statistic="entropy")
    with pytest.raises(ConfigError, match="needs n_reference_models >= 2"):
        audit(model, members, non_members, attacks=("lira-online",), recipe=zoo.recipe)


def test_reference_models_are_trained_on_their_halves(zoo):
    # a model fits its own half better than the other half: the keep matrix is the truth
    for model, keep in zip(zoo.models.models, zoo.models.keep):
        logits = model(zoo.pool.x).detach()
        correct = logits.argmax(1) == zoo.pool.y
        assert correct[keep].float().mean() == 1.0
        assert correct[~keep].float().mean() < 0.97
    assert isinstance(zoo.models, ReferenceModels)


def _linear_problem(features: int, n: int, high: float, spread: float, dual_norm: float):
    """A two-class linear model whose boundary passes through the centre of the box [0, high]^features,
    points near that centre with their predicted labels, and each point's exact distance to the
    boundary in the norm whose dual is ``dual_norm``: |w.x + b| / ||w||_dual."""
    torch.manual_seed(0)
    model = torch.nn.Linear(features, 2)
    with torch.no_grad():
        model.bias.copy_(-model.weight.sum(1) * high / 2)
    x = (high / 2 + spread * torch.randn(n, features)).clamp(0, high)
    y = model(x).argmax(1).detach()
    w = (model.weight[1] - model.weight[0]).detach()
    exact = (x @ w + model.bias[1] - model.bias[0]).abs().detach() / w.norm(p=dual_norm)
    return model, x, y, exact


def test_hopskipjump_distance_bounds_a_linear_models_distance_from_above():
    # Prepare: the exact L2 distance to a linear boundary is |w.x + b| / ||w||_2
    model, x, y, exact = _linear_problem(6, 30, high=1.0, spread=0.1, dual_norm=2)
    y[:3] = 1 - y[:3]  # three examples misclassified: distance 0
    # Execute
    found = hopskipjump_boundary_distance(model, x, y, max_queries=2000)
    # Assert: never below the true minimum, close to it, and 0 where the label is already wrong
    assert torch.equal(found[:3], torch.zeros(3))
    assert bool((found[3:] >= exact[3:] * (1 - 1e-4)).all())
    assert float((found[3:] / exact[3:]).median()) < 1.1


@pytest.mark.parametrize(("norm", "dual_norm"), [("l2", 2), ("linf", 1)])
def test_pgd_distance_finds_a_linear_models_distance(norm, dual_norm):
    # Prepare: the exact distance to a linear boundary is |w.x + b| / ||w||_dual
    model, x, y, exact = _linear_problem(6, 40, high=1.0, spread=0.1, dual_norm=dual_norm)
    # Execute
    found = pgd_boundary_distance(model, x, y, norm=norm, bisection_steps=20)
    # Assert: from x itself the ascent runs straight to the boundary (measured: within 2e-5; a random
    # start tilted it, to medians of 1.45 (L2) and 1.25 (L-inf) times the exact distance)
    torch.testing.assert_close(found, exact, rtol=1e-3, atol=0)


def test_hopskipjump_distance_works_in_a_box_narrower_than_one():
    # Prepare: inputs in [0, 0.5]; the exact L-inf distance is |w.x + b| / ||w||_1
    model, x, y, exact = _linear_problem(4, 8, high=0.5, spread=0.02, dual_norm=1)
    # Execute
    found = hopskipjump_boundary_distance(model, x, y, norm="linf", bounds=(0.0, 0.5), max_queries=500)
    # Assert: never below the true minimum and close to it (measured: within 6%)
    assert bool((found >= exact * (1 - 1e-4)).all())
    assert float((found / exact).median()) < 1.2


def test_lira_in_the_audit_of_a_run_trains_reference_models_on_the_spare_data_too(digits, monkeypatch):
    # Prepare: record the pool LiRA's reference models are drawn from; untrained models are enough
    audit_module = importlib.import_module("fortify.privacy.audit")  # the package exports a function audit
    pools: list[Split] = []

    def recording(pool: Split, recipe, *, n_models: int, seed: int = 0):
        pools.append(pool)
        return train_reference_models(pool, recipe, n_models=n_models, seed=seed)

    monkeypatch.setattr(audit_module, "train_reference_models", recording)
    model = _untrained_recipe(digits.train, seed=0)
    # Execute
    report = audit_module.audit_trained_model(model, digits, recipe=_untrained_recipe, n_reference_models=2,
                                              n_examples=100, inversion=False,
                                              attacks=("lira-offline",))
    # Assert: candidates, the training examples past the first 100 and the validation split
    (pool,) = pools
    rows_in_pool = {tuple(r) for r in pool.x.reshape(len(pool), -1).tolist()}
    for spare in (Split(digits.train.x[100:], digits.train.y[100:]), digits.val):
        assert all(tuple(r) in rows_in_pool for r in spare.x.reshape(len(spare), -1).tolist())
    # half of the distinct pool is below the 1,258 examples the model trained on: the report says so
    assert any("reference models trained on about" in w for w in report.warnings), report.warnings


def test_reference_models_do_not_train_on_the_split_their_recipe_validates_on(digits, monkeypatch):
    # Prepare: a recipe that validates on the validation split, as the CLI's does
    audit_module = importlib.import_module("fortify.privacy.audit")
    pools: list[Split] = []

    def recording(pool: Split, recipe, *, n_models: int, seed: int = 0):
        pools.append(pool)
        return train_reference_models(pool, recipe, n_models=n_models, seed=seed)

    class ValidatingRecipe:
        val = digits.val

        def __call__(self, train: Split, *, seed: int) -> nn.Module:
            return _untrained_recipe(train, seed=seed)

    monkeypatch.setattr(audit_module, "train_reference_models", recording)
    # Execute
    model = _untrained_recipe(digits.train, seed=0)
    audit_module.audit_trained_model(model, digits, recipe=ValidatingRecipe(), n_reference_models=2,
                                     n_examples=100, inversion=False, attacks=("lira-offline",))
    # Assert: the spare training examples are in the pool, no validation example is
    (pool,) = pools
    rows_in_pool = {tuple(r) for r in pool.x.reshape(len(pool), -1).tolist()}
    assert all(tuple(r) in rows_in_pool for r in digits.train.x[100:].reshape(-1, 64).tolist())
    assert not any(tuple(r) in rows_in_pool for r in digits.val.x.reshape(len(digits.val), -1).tolist())


def test_trainer_recipe_builds_the_runs_own_objective_with_every_setting(monkeypatch):
    # Prepare: record what the recipe hands the Trainer instead of training
    recipe_module = importlib.import_module("fortify.privacy.recipe")
    objectives = []

    class RecordingTrainer:
        def __init__(self, model, objective, config, **kwargs):
            objectives.append(objective)
            self.model = model

        def fit(self, train, val):
            return None

    monkeypatch.setattr(recipe_module, "Trainer", RecordingTrainer)
    config = TrainConfig(objective="trades", trades_beta=1.0, label_smoothing=0.2, attack_steps=3)
    recipe = recipe_module.TrainerRecipe(lambda: nn.Linear(4, 2), config, ThreatModel("linf", 0.1))
    # Execute
    recipe(Split(torch.rand(8, 4), torch.randint(0, 2, (8,))), seed=7)
    # Assert
    (objective,) = objectives
    assert (objective.name, objective.beta, objective.label_smoothing) == ("trades", 1.0, 0.2)
    assert (objective.options.attack_steps, objective.options.seed) == (3, 7)


def test_the_shadow_attack_scores_confident_rows_without_ties():
    # Prepare: an attack classifier on two far-apart clusters, then rows further and further out,
    # where its probability of "member" rounds to exactly 1.0
    from fortify.privacy.membership import _member_scores, default_attack_classifier

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(-3, 1, (50, 2)), rng.normal(3, 1, (50, 2))])
    classifier = default_attack_classifier()
    classifier.fit(features, np.repeat([0, 1], 50))
    far = np.linspace(20, 60, 9)[:, None].repeat(2, axis=1)
    assert (classifier.predict_proba(far)[:, 1] == 1.0).sum() >= 5  # the saturation this is about
    # Execute
    scores = _member_scores({}, classifier, far, np.zeros(len(far), dtype=np.int64))
    # Assert: nine distinct scores, increasing with the distance as the classifier ranks them
    assert np.all(np.diff(scores) > 0)
