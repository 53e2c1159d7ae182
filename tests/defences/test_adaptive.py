"""EOT, BPDA and margin PGD: what their gradients are, and the attack success they recover."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.attacks import PGD
from fortify.attacks.adaptive import BPDA, EOT, MarginPGD, logit_margin
from fortify.defences import DefensiveDistillation, GaussianNoise, InputQuantization
from fortify.errors import ConfigError
from fortify.threat import ThreatModel


def _success(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int = 1) -> float:
    """Share of examples misclassified at x_adv, averaged over draws of a randomised model."""
    with torch.no_grad():
        return float(torch.stack([(model(x_adv).argmax(1) != y).float() for _ in range(draws)]).mean())


def test_logit_margin_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
    assert torch.equal(logit_margin(logits, torch.tensor([0, 1])), torch.tensor([1.0, 0.0]))
    assert torch.equal(logit_margin(logits, torch.tensor([1, 0])), torch.tensor([-2.0, -5.0]))


def test_eot_averages_the_logits_of_independent_draws():
    # Prepare: two copies of the same seeded randomised model
    model = nn.Linear(6, 3)
    x = torch.rand(5, 6)
    wrapped = EOT(GaussianNoise(model, sigma=0.5, seed=4), n_samples=7)
    reference = GaussianNoise(model, sigma=0.5, seed=4)
    # Execute
    averaged = wrapped(x)
    # Assert
    expected = torch.stack([reference(x) for _ in range(7)]).mean(0)
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert torch.allclose(EOT(model, 3)(x), model(x), atol=1e-6), "no randomness: EOT is the model"
    with pytest.raises(ConfigError, match="n_samples"):
        EOT(model, 0)


def test_bpda_forward_is_the_defence_and_backward_is_straight_through():
    # Prepare
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    defence = InputQuantization(model, bits=2)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    # Execute
    out = BPDA.around(defence)(x)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    # Assert: the value is the quantised model's, the gradient the model's at the quantised point
    quantised = defence.transform(x.detach()).requires_grad_(True)
    (expected,) = torch.autograd.grad(model(quantised)[:, 0].sum(), quantised)
    assert torch.equal(out, defence(x))
    assert torch.allclose(grad, expected)


def test_bpda_uses_the_given_approximation_in_the_backward_pass():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    wrapped = BPDA(model, transform=torch.round, approximation=lambda t: 3 * t)
    (grad,) = torch.autograd.grad(wrapped(x)[:, 1].sum(), x)
    assert torch.allclose(grad, 3 * model[1].weight[1].expand(3, 4))


def test_bpda_recovers_the_success_that_quantisation_hides(standard_model, digits):
    # Prepare
    x, y = digits.test.x[:100], digits.test.y[:100]
    defence = InputQuantization(standard_model, bits=3)
    attack = PGD(ThreatModel("linf", 0.2), steps=10)
    # Execute
    plain = _success(defence, attack(defence, x, y), y)
    adaptive = _success(defence, attack(BPDA.around(defence), x, y), y)
    # Assert: measured 0.03 -> 0.89 on this model; plain PGD is stuck at the random start
    assert plain < 0.15
    assert adaptive > plain + 0.5


@pytest.mark.slow
def test_eot_recovers_success_that_noise_hides(standard_model, digits):
    # Prepare
    x, y = digits.test.x[:100], digits.test.y[:100]
    defence = GaussianNoise(standard_model, sigma=0.25, seed=0)
    attack = PGD(ThreatModel("linf", 0.1), steps=10)
    # Execute: the same attack against the defence and against its expectation
    plain = _success(defence, attack(defence, x, y), y, draws=10)
    adaptive = _success(defence, attack(EOT(defence, 8), x, y), y, draws=10)
    # Assert: measured gains of 0.09 to 0.14 over defence seeds 0-3 (0.27 -> 0.37 at seed 0)
    assert adaptive > plain + 0.05


def test_margin_pgd_recovers_the_success_that_distillation_hides(standard_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]
    defence = DefensiveDistillation(standard_model, temperature=100)
    threat = ThreatModel("linf", 0.2)
    plain = _success(defence, PGD(threat, steps=10)(defence, x, y), y)
    margin = _success(defence, MarginPGD(threat, steps=10)(defence, x, y), y)
    # measured 0.07 -> 0.97: the cross-entropy gradient underflows, the margin's does not
    assert margin > plain + 0.5
