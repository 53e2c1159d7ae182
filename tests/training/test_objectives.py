"""Settings every objective shares: label smoothing of the training loss (never of the attack),
FGSM's clean and adversarial passes (one clean pass where the model allows), and FGSM-RS's step during
eps warm-up."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counting import record_modes_of_passes
from fortify.attacks import FGSM
from fortify.errors import ConfigError
from fortify.threat import ThreatModel
from fortify.training.methods import MethodOptions
from fortify.training.objectives import OBJECTIVES, ObjectiveOptions, build_objective

THREAT = ThreatModel("linf", 0.05)


def _tiny_problem(n: int = 16, features: int = 10, classes: int = 3):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, features, generator=gen)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _mlp(features: int = 10, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _build(name: str, smoothing: float):
    return build_objective(name, MethodOptions(THREAT, attack_steps=2, free_replays=2,
                                               label_smoothing=smoothing))


def _crafting() -> list[str]:
    """The objectives that craft their points with an attack of their own (``craft``)."""
    return [name for name in OBJECTIVES.names() if hasattr(_build(name, 0.0), "craft")]


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_label_smoothing_changes_the_training_loss_of_every_objective(name):
    x, y = _tiny_problem()
    plain, smoothed = (_build(name, s)(_mlp(), x, y) for s in (0.0, 0.3))
    assert torch.isfinite(smoothed)
    assert not torch.allclose(plain, smoothed), f"{name} ignores label_smoothing"


def test_label_smoothing_zero_is_plain_cross_entropy():
    x, y = _tiny_problem()
    model = _mlp()
    assert torch.equal(_build("standard", 0.0)(model, x, y), F.cross_entropy(model(x), y))
    assert torch.allclose(_build("standard", 0.3)(model, x, y),
                          F.cross_entropy(model(x), y, label_smoothing=0.3))


@pytest.mark.parametrize("name", _crafting())
def test_the_attack_of_every_objective_ignores_label_smoothing(name):
    x, y = _tiny_problem()
    model = _mlp()
    plain, smoothed = (_build(name, s).craft(model, x, y) for s in (0.0, 0.3))
    assert torch.equal(plain, smoothed)


def test_fgsm_with_a_ratio_passes_the_clean_and_the_adversarial_batch_separately():
    # Prepare: BatchNorm in train mode, so one pass over both halves would mix their statistics
    x, y = _tiny_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    reference = copy.deepcopy(model)
    objective = build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=0.25))
    # Execute
    loss = objective(model, x, y)
    # Assert: the two-pass loss; the attack (eval mode) left the running statistics alone
    x_adv = FGSM(THREAT)(reference, x, y)
    expected = 0.75 * F.cross_entropy(reference(x), y) + 0.25 * F.cross_entropy(reference(x_adv), y)
    assert torch.allclose(loss, expected)
    assert torch.allclose(model[1].running_mean, reference[1].running_mean)
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("dropout", [False, True])
def test_fgsm_with_a_ratio_passes_the_clean_batch_once_when_the_model_runs_alike_in_both_modes(dropout):
    # Prepare: plain layers (one pass serves the FGSM step and the clean term), and the same with a
    # dropout, which must keep the attack's eval-mode pass
    torch.manual_seed(0)
    layers = [nn.Linear(10, 16), nn.ReLU()] + ([nn.Dropout(0.0)] if dropout else []) + [nn.Linear(16, 3)]
    model = nn.Sequential(*layers).train()
    x, y = _tiny_problem()
    calls, stop = record_modes_of_passes(model)
    # Execute
    try:
        build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=0.25))(model, x, y)
    finally:
        stop()
    # Assert
    assert calls == ([False, True, True] if dropout else [True, True])


def test_fgsm_with_one_clean_pass_gives_the_loss_and_gradients_of_the_two_passes():
    # Prepare: a model that runs alike in both modes, and its twin for the reference computation
    x, y = _tiny_problem(32)
    model, reference = _mlp(), _mlp()
    objective = build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=0.3, label_smoothing=0.1))
    # Execute
    loss = objective(model, x, y)
    loss.backward()
    # Assert: FGSM's points from the attack itself, then a pass for each term
    x_adv = FGSM(THREAT)(reference, x, y)
    expected = (0.7 * F.cross_entropy(reference(x), y, label_smoothing=0.1)
                + 0.3 * F.cross_entropy(reference(x_adv), y, label_smoothing=0.1))
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    for (name, weight), twin in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(weight.grad, twin.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("ratio", [-0.5, 1.5, float("nan"), float("inf")])
def test_fgsm_refuses_a_ratio_outside_0_to_1(ratio):
    # -0.5 crafted FGSM points with a negative weight, NaN gave a NaN loss, 1.5 a negative clean weight
    with pytest.raises(ConfigError, match=r"fgsm_ratio must be in \[0, 1\]"):
        build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=ratio))


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_fgsm_at_either_end_of_its_ratio_passes_the_model_only_as_often_as_it_needs(ratio):
    # ratio 0 is clean training: no FGSM point (one forward, no input gradient); ratio 1 drops the
    # clean term: the attack's forward and backward, then one pass over the FGSM points
    x, y = _tiny_problem()
    model, reference = _mlp(), _mlp()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].requires_grad))
    loss = build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=ratio))(model, x, y)
    points = x if ratio == 0.0 else FGSM(THREAT)(reference, x, y)
    assert torch.allclose(loss, F.cross_entropy(reference(points), y))
    assert calls == ([False] if ratio == 0.0 else [True, False])
    # clean training validates and selects on clean accuracy (no PGD validation)
    assert build_objective("fgsm", ObjectiveOptions(THREAT, fgsm_ratio=ratio)).adversarial is (ratio > 0)


def test_fgsm_rs_keeps_a_configured_step_at_its_share_of_eps_during_warm_up():
    threat = ThreatModel("linf", 0.2)
    configured = build_objective("fgsm-rs", ObjectiveOptions(threat, attack_step_size=0.1))
    default = build_objective("fgsm-rs", ObjectiveOptions(threat))
    for objective in (configured, default):
        objective.set_eps(0.05)
    assert configured.attack.step_size == pytest.approx(0.025)
    assert default.attack.step_size == pytest.approx(1.25 * 0.05)
    configured.set_eps(0.2)
    assert configured.attack.step_size == pytest.approx(0.1)
