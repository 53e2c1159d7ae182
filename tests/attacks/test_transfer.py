"""Transfer: points crafted on a surrogate, judged on the target."""

from __future__ import annotations

import torch

from fortify.attacks import PGD
from fortify.attacks.transfer import Transfer
from fortify.evaluation import evaluate
from fortify.threat import ThreatModel

THREAT = ThreatModel("linf", 0.2)


def test_transfer_uses_the_surrogate_not_the_target(standard_model, robust_model, digits):
    x, y = digits.test.x[:120], digits.test.y[:120]
    source = PGD(THREAT, steps=10, seed=3)
    transfer = Transfer(source, surrogate=standard_model)
    # the points equal the source attack's points on the surrogate, whatever the target is
    assert torch.equal(transfer(robust_model, x, y), source(standard_model, x, y))


def test_transfer_is_weaker_than_white_box_and_inside_the_threat_model(standard_model, robust_model, digits):
    x, y = digits.test.x, digits.test.y
    white = PGD(THREAT, steps=10)
    transfer = Transfer(PGD(THREAT, steps=10), surrogate=standard_model)
    report = evaluate(robust_model, x, y, [white, transfer], THREAT)
    white_acc = report.attack("pgd-10").adversarial_accuracy
    transfer_acc = report.attack("transfer(pgd-10)").adversarial_accuracy
    # a PGD-trained target resists points crafted on a standard surrogate better than its own PGD
    assert transfer_acc >= white_acc
    assert transfer_acc <= report.clean_accuracy
