"""EOT, BPDA and margin PGD: what their gradients are, and the attack success they recover."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.attacks import PGD
from fortify.attacks.adaptive import BPDA, EOT, MarginPGD, logit_margin
from fortify.defences import DefensiveDistillation, GaussianNoise, InputQuantization, JPEGCompression
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
    for bad in (0, None, float("nan"), float("inf"), "4", True):
        with pytest.raises(ConfigError, match="n_samples must be an integer >= 1"):
            EOT(model, bad)


class _Alternating(nn.Module):
    """A 'randomised' model whose draws are known: its calls cycle through two linear maps."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.maps = nn.ModuleList([nn.Linear(features, classes).double() for _ in range(2)])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.maps[(self.calls - 1) % 2](x.flatten(1))


def _input_gradient(loss_of_x, x: torch.Tensor) -> torch.Tensor:
    point = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_x(point).sum(), point)
    return grad


@pytest.mark.parametrize("average", ["loss", "logits"])
def test_eot_gives_attacks_the_mean_loss_or_the_loss_of_the_mean_logits(average):
    # Prepare: two draws cover the alternating model's distribution exactly
    model = _Alternating()
    x, y = torch.rand(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    first, second = model.maps
    attack = PGD(ThreatModel("linf", 0.1))
    ce = torch.nn.functional.cross_entropy
    # Execute
    loss, logits = attack.loss_and_logits(EOT(model, 2, average=average), x, y, None)
    grad = _input_gradient(lambda p: attack.loss_and_logits(EOT(model, 2, average=average), p, y, None)[0], x)
    # Assert: the logits that judge success are the mean in both; the loss (and so the gradient) is the
    # mean of the draws' losses (Athalye et al.) or the loss of the mean logits
    mean_logits = (first(x) + second(x)) / 2
    assert torch.allclose(logits, mean_logits)
    if average == "loss":
        expected = lambda p: (ce(first(p), y, reduction="none") + ce(second(p), y, reduction="none")) / 2  # noqa: E731
    else:
        expected = lambda p: ce((first(p) + second(p)) / 2, y, reduction="none")  # noqa: E731
    assert torch.allclose(loss, expected(x))
    assert torch.allclose(grad, _input_gradient(expected, x))
    with pytest.raises(ConfigError, match="valid: loss, logits"):
        EOT(model, 2, average="gradients")


def test_eot_pgd_takes_torchattacks_eotpgd_steps():
    """torchattacks' EOTPGD sums the loss gradients of eot_iter passes per step: on a model whose
    draws are known, fortify's PGD against EOT(average="loss") must reach the same final iterate."""
    torchattacks = pytest.importorskip("torchattacks")
    x = torch.rand(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    eps, alpha, steps = 0.1, 0.02, 7
    # Execute: both start at x; fortify keeps the final iterate as torchattacks does
    ours = PGD(ThreatModel("linf", eps), steps=steps, step_size=alpha, random_start=False,
               keep_first_success=False)(EOT(_Alternating(), 2), x, y)
    theirs = torchattacks.EOTPGD(_Alternating(), eps=eps, alpha=alpha, steps=steps, eot_iter=2,
                                 random_start=False)(x, y)
    # Assert
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert not torch.allclose(ours, x)


def _model_at(model: nn.Module, point: torch.Tensor) -> torch.Tensor:
    """The gradient of the first logit's sum at ``point``."""
    point = point.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(point)[:, 0].sum(), point)
    return grad


def test_bpda_forward_is_the_defence_and_backward_is_straight_through():
    # Prepare: a curved model, whose gradient differs between x and the quantised point
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    defence = InputQuantization(model, bits=2)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    # Execute
    out = BPDA.around(defence)(x)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    # Assert: the value is the quantised model's, the gradient the model's at the quantised point
    # (Athalye et al. 2018, section 4.1: the forward pass through the true transform), not at x
    assert torch.equal(out, defence(x))
    assert torch.allclose(grad, _model_at(model, defence.transform(x.detach())))
    assert not torch.allclose(grad, _model_at(model, x), rtol=1e-3)


def test_bpda_uses_the_given_approximation_in_the_backward_pass():
    # Prepare: a curved approximation, whose Jacobian differs between x and round(x)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    x = (torch.rand(3, 4, dtype=torch.float64) * 4).requires_grad_(True)
    wrapped = BPDA(model, transform=torch.round, approximation=torch.sin)
    # Execute
    (grad,) = torch.autograd.grad(wrapped(x)[:, 1].sum(), x)
    # Assert: the approximation's vector-Jacobian product at x itself
    upstream = model[1].weight[1].expand(3, 4)
    assert torch.allclose(grad, torch.cos(x.detach()) * upstream)
    assert not torch.allclose(grad, torch.cos(torch.round(x.detach())) * upstream, rtol=1e-3)


def test_bpda_refuses_a_defence_without_a_transform_and_a_shape_its_identity_cannot_pass():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ConfigError, match="DefensiveDistillation has no transform"):
        BPDA.around(DefensiveDistillation(model))
    pooled = BPDA(model, transform=lambda t: torch.nn.functional.avg_pool2d(t, 2))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ConfigError, match=r"turned \(4, 1, 8, 8\) into \(4, 1, 4, 4\)"):
        PGD(ThreatModel("linf", 0.1), steps=2)(pooled, x, y)


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
@pytest.mark.parametrize("seed", range(4))
def test_against_noise_final_iterates_find_what_first_hits_miss(standard_model, digits, seed):
    # Prepare: PGD-10 at L-inf 0.1 against Gaussian noise, scored over 10 fresh draws
    x, y = digits.test.x[:100], digits.test.y[:100]
    threat = ThreatModel("linf", 0.1)
    first_hits, final_iterates = PGD(threat, steps=10), PGD(threat, steps=10, keep_first_success=False)

    def success(attack, expectation: bool) -> float:
        defence = GaussianNoise(standard_model, sigma=0.25, seed=seed)
        return _success(defence, attack(EOT(defence, 8) if expectation else defence, x, y), y, draws=10)

    # Execute
    rows = {(attack, eot): success(attack, eot)
            for attack in (first_hits, final_iterates) for eot in (False, True)}
    # Assert: a first hit on one draw sits at the boundary and fresh draws mostly undo it; EOT's mean
    # makes that hit sturdier, but the final iterate, which climbed the loss for every step, goes
    # further, with EOT or without (docs/ATTACKS.md, EOT against torchattacks' EOTPGD)
    print(f"seed {seed}: first hits {rows[first_hits, False]:.2f}, with EOT {rows[first_hits, True]:.2f}; "
          f"final iterates {rows[final_iterates, False]:.2f}, with EOT {rows[final_iterates, True]:.2f}")
    assert rows[first_hits, True] > rows[first_hits, False] + 0.05
    assert rows[final_iterates, False] > rows[first_hits, True]
    assert rows[final_iterates, True] >= rows[final_iterates, False] - 0.03


def test_margin_pgd_recovers_the_success_that_distillation_hides(standard_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]
    defence = DefensiveDistillation(standard_model, temperature=100)
    threat = ThreatModel("linf", 0.2)
    plain = _success(defence, PGD(threat, steps=10)(defence, x, y), y)
    margin = _success(defence, MarginPGD(threat, steps=10)(defence, x, y), y)
    # measured 0.07 -> 0.97: the cross-entropy gradient underflows, the margin's does not
    assert margin > plain + 0.5


def test_bpda_around_a_defence_moves_the_defences_buffers_with_it():
    # Prepare: JPEG keeps its DCT matrix and quantisation tables as buffers
    defence = JPEGCompression(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), quality=50)
    bpda = BPDA.around(defence)
    # Execute
    bpda.to(torch.float64)
    # Assert: the transform BPDA runs sees its buffers converted, so it runs where the model runs
    assert defence.dct.dtype == torch.float64 and defence.tables.dtype == torch.float64
    assert bpda(torch.rand(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64
