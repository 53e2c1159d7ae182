"""Transfer: points crafted on a surrogate, judged on the target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.attacks import PGD
from fortify.attacks.transfer import Transfer
from fortify.config import EvalConfig
from fortify.errors import ConfigError
from fortify.evaluation import evaluate
from fortify.pipeline import SETTING_READERS, build_attacks
from fortify.threat import ThreatModel

THREAT = ThreatModel("linf", 0.2)


def test_transfer_uses_the_surrogate_not_the_target(standard_model, robust_model, digits):
    x, y = digits.test.x[:120], digits.test.y[:120]
    transfer = Transfer(PGD(THREAT, steps=10, seed=3), surrogate=standard_model)
    # the points equal PGD's final iterates on the surrogate, whatever the target is: first hits lie
    # just past the surrogate's boundary and seldom transfer
    final = PGD(THREAT, steps=10, seed=3, keep_first_success=False)
    assert torch.equal(transfer(robust_model, x, y), final(standard_model, x, y))
    assert transfer.describe()["source"]["keep_first_success"] is False


def test_a_surrogate_without_parameters_runs_where_the_inputs_are(digits):
    x, y = digits.test.x[:8], digits.test.y[:8]
    surrogate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Hardtanh())  # 64 "logits", no weights
    assert Transfer(PGD(THREAT, steps=2), surrogate=surrogate)(surrogate, x, y).shape == x.shape


def test_transfer_is_weaker_than_white_box_and_inside_the_threat_model(standard_model, robust_model, digits):
    x, y = digits.test.x, digits.test.y
    white = PGD(THREAT, steps=10)
    transfer = Transfer(PGD(THREAT, steps=10), surrogate=standard_model)
    report = evaluate(robust_model, x, y, [white, transfer], THREAT)
    white_acc = report.attack("pgd-10").adversarial_accuracy
    transfer_acc = report.attack("transfer(pgd-10)").adversarial_accuracy
    # a PGD-trained target resists points crafted on a standard surrogate better than its own PGD:
    # measured 56.3% robust against 46.0% (85.2% clean). evaluate checks every point against the
    # threat model before it counts it.
    assert transfer_acc >= white_acc + 0.05


def test_transfer_from_a_robust_surrogate_breaks_most_of_a_standard_target(standard_model, robust_model,
                                                                          digits):
    # a PGD-trained surrogate's loss gradients point at features a standard model also uses: its final
    # iterates left 33% of the standard model's digits robust, its first hits 57%
    x, y = digits.test.x, digits.test.y
    report = evaluate(standard_model, x, y, [Transfer(PGD(THREAT, steps=10), surrogate=robust_model)], THREAT)
    assert report.clean_accuracy > 0.95
    assert report.attacks[0].adversarial_accuracy < 0.45


def test_the_transfer_attacks_pgd_reads_steps_and_its_attack_options():
    # --steps was refused for transfer, and its attack_options were dropped without a word
    config = EvalConfig(attacks=["transfer"], steps=7, surrogate="elsewhere",
                        attack_options={"transfer": {"restarts": 2}})
    (attack,) = build_attacks(config, ThreatModel("linf", 0.1), 10, surrogate=nn.Identity())
    assert (attack.source_attack.steps, attack.source_attack.restarts) == (7, 2)
    assert "transfer" in SETTING_READERS["steps"]
    bogus = config.model_copy(update={"attack_options": {"transfer": {"bogus": 1}}})
    with pytest.raises(ConfigError, match="attack_options for 'transfer': unknown option 'bogus'"):
        build_attacks(bogus, ThreatModel("linf", 0.1), 10, surrogate=nn.Identity())
