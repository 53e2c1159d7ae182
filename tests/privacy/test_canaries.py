"""Canary audit: Clopper-Pearson bounds, the epsilon they imply, and the audit on real training."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom
from torch import nn

from fortify.config import DPConfig, TrainConfig, load_config
from fortify.data import Dataset
from fortify.data.base import Split
from fortify.data.rows import shared_rows
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.pipeline import audited_dataset, prepare
from fortify.privacy.canaries import (
    audit_canaries,
    clopper_pearson,
    epsilon_from_rates,
    insert_canaries,
)
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.1)


# -- the statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize(("successes", "trials"), [(0, 20), (7, 20), (20, 20), (1, 3)])
def test_clopper_pearson_ends_leave_exactly_alpha_over_two_in_each_tail(successes: int, trials: int) -> None:
    low, high = clopper_pearson(successes, trials, 0.95)
    if successes > 0:  # P(X >= k | p = low) = 0.025
        assert binom.sf(successes - 1, trials, low) == pytest.approx(0.025, rel=1e-6)
    else:
        assert low == 0.0
    if successes < trials:  # P(X <= k | p = high) = 0.025
        assert binom.cdf(successes, trials, high) == pytest.approx(0.025, rel=1e-6)
    else:
        assert high == 1.0
    assert low <= successes / trials <= high


def test_clopper_pearson_at_perfect_separation_has_a_closed_form() -> None:
    low, _ = clopper_pearson(25, 25, 0.95)
    _, high = clopper_pearson(0, 25, 0.95)
    assert low == pytest.approx(0.025 ** (1 / 25))
    assert high == pytest.approx(1 - 0.025 ** (1 / 25))


def test_epsilon_from_rates_takes_the_stronger_of_both_inequalities() -> None:
    assert epsilon_from_rates(0.5, 0.1, 0.0) == pytest.approx(math.log(5.0))
    assert epsilon_from_rates(0.9, 0.5, 0.0) == pytest.approx(math.log(0.5 / 0.1))  # via 1 - TPR
    assert epsilon_from_rates(0.5, 0.1, 0.05) == pytest.approx(math.log(4.5))
    assert epsilon_from_rates(0.3, 0.4, 0.0) == 0.0  # a test worse than chance bounds nothing


# -- canaries -----------------------------------------------------------------------------------

def test_canaries_are_mislabelled_half_inserted_and_their_originals_removed(digits: Dataset) -> None:
    train = Split(digits.train.x[:400], digits.train.y[:400])
    with_canaries, canaries = insert_canaries(train, 30, digits.num_classes, seed=1)
    assert len(with_canaries) == 400 - 60 + 30
    assert int(canaries.inserted.sum()) == 30
    originals = shared_rows(canaries.x, train.x)[:, 1]
    assert (train.y[originals] != canaries.y).all()
    held_out = canaries.x[~canaries.inserted]
    assert shared_rows(held_out, with_canaries.x).numel() == 0
    assert shared_rows(canaries.members.x, with_canaries.x).shape[0] == 30


@pytest.mark.parametrize(("per_side", "match"), [
    (0, "integer >= 2"), (1, "integer >= 2"), (2.0, "integer >= 2"), (101, "at least 404")])
def test_bad_canary_counts_are_config_errors(digits: Dataset, per_side: int, match: str) -> None:
    train = Split(digits.train.x[:400], digits.train.y[:400])
    with pytest.raises(ConfigError, match=match):
        insert_canaries(train, per_side, digits.num_classes, seed=0)


def test_one_canary_per_side_is_refused_with_the_config_before_any_training() -> None:
    # the audit needs two per side; one used to train a whole model first and then fail
    with pytest.raises(ValueError, match="canaries must be 0 \\(off\\) or at least 2 per side"):
        DPConfig(canaries=1)
    assert DPConfig(canaries=2).canaries == 2


# -- the audit on trained models ----------------------------------------------------------------

def _canary_data(digits: Dataset) -> tuple[Split, object]:
    train = Split(digits.train.x[:400], digits.train.y[:400])
    return insert_canaries(train, 64, digits.num_classes, seed=0)


def _config(epochs: int, lr: float, optimizer: str = "adam") -> TrainConfig:
    return TrainConfig(objective="standard", epochs=epochs, batch_size=64, optimizer=optimizer, lr=lr,
                       momentum=0.0, weight_decay=0.0, schedule="constant", early_stopping=False)


def _mlp(digits: Dataset) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", digits.input_shape, digits.num_classes)


@pytest.mark.slow
def test_a_model_that_memorises_its_canaries_gets_a_clearly_positive_bound(digits: Dataset) -> None:
    train, canaries = _canary_data(digits)
    model = _mlp(digits)
    trainer = Trainer(model, build_objective("standard", ObjectiveOptions(THREAT)), _config(60, 3e-3),
                      threat=THREAT, show_progress=False)
    trainer.fit(train, digits.val)
    audit = audit_canaries(model, canaries, delta=1e-5)
    assert audit.auc > 0.95
    assert audit.epsilon_lower > 1.0
    assert audit.epsilon_upper is None


@pytest.mark.slow
def test_a_strongly_private_model_gets_a_bound_near_zero_below_the_accountant(digits: Dataset) -> None:
    from fortify.training.dp import DPTrainer

    train, canaries = _canary_data(digits)
    trainer = DPTrainer(_mlp(digits), build_objective("standard", ObjectiveOptions(THREAT)),
                        _config(20, 0.5, optimizer="sgd"),
                        dp=DPConfig(enabled=True, noise_multiplier=5.0, max_grad_norm=1.0),
                        threat=THREAT, show_progress=False)
    result = trainer.fit(train, digits.val)
    assert result.privacy is not None
    audit = audit_canaries(trainer.model, canaries, delta=1e-5, epsilon_upper=result.privacy.epsilon)
    assert audit.epsilon_lower < 0.5
    assert audit.epsilon_lower <= audit.epsilon_upper


def test_the_membership_audit_of_a_canary_run_leaves_out_every_canary_original() -> None:
    # Prepare: a run with 20 canaries a side, set up as `fortify train --dp --canaries 20` does
    setup = prepare(load_config(None, {"dp": {"enabled": True, "noise_multiplier": 1.0, "canaries": 20},
                                       "train": {"seed": 3}}), "cpu")
    train = setup.dataset.train
    trained, canaries = insert_canaries(train, 20, setup.dataset.num_classes, seed=3)
    # Execute
    members = audited_dataset(setup).train
    # Assert: 2N fewer members, none of them a canary's original, all trained on with their label
    assert len(members) == len(train) - 40
    assert shared_rows(members.x, canaries.x).numel() == 0
    pairs = shared_rows(members.x, trained.x)
    assert len(pairs) == len(members) and torch.equal(members.y[pairs[:, 0]], trained.y[pairs[:, 1]])
