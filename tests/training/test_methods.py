"""TRADES, MART, Free AT, AWP and the clean/adversarial mix: hand-computed losses, the replay and
weight-restoration contracts, learning on a tiny problem, and a robustness band on digits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counting import record_modes_of_passes
from fortify.attacks import PGD
from fortify.config import TrainConfig
from fortify.data import Split
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.awp import AWPObjective, perturbable
from fortify.training.free import FreeObjective
from fortify.training.methods import METHODS, MethodOptions, build_pgd, method_options
from fortify.training.objectives import OBJECTIVES, ObjectiveOptions, build_objective
from fortify.training.trades import KLAttack
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.05)


def _tiny_problem(n: int = 32, features: int = 10, classes: int = 3):
    """Points in [0, 1]^features labelled by a random linear teacher."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, features, generator=gen)
    teacher = torch.randn(features, classes, generator=gen)
    return x, ((x - 0.5) @ teacher).argmax(1)


def _mlp(features: int = 10, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))


def _fixed_linear(dtype=torch.float64) -> nn.Linear:
    """Three classes over four features with hand-picked weights."""
    model = nn.Linear(4, 3).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0],
                                         [-1.0, 1.0, 1.5, -0.5],
                                         [0.5, 0.5, -1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return model


def _two_examples(dtype=torch.float64):
    x = torch.tensor([[0.2, 0.7, 0.4, 0.9], [0.6, 0.1, 0.8, 0.3]], dtype=dtype)
    delta = torch.tensor([[0.05, -0.05, 0.05, -0.05], [-0.05, 0.05, 0.05, 0.05]], dtype=dtype)
    return x, x + delta, torch.tensor([0, 2])


def _softmax_by_hand(logits):
    exps = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return exps / exps.sum(dim=1, keepdim=True)


def _replay(objective, model, optimizer, x, y):
    """What the Trainer does for each replay of a batch."""
    loss = objective(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    objective.after_backward(model)
    optimizer.step()
    return loss.detach()


# -- registration and options ------------------------------------------------------------------

def test_every_method_is_registered_and_reads_its_settings():
    assert set(METHODS) <= set(OBJECTIVES.names())
    options = MethodOptions(THREAT, trades_beta=2.0, mart_beta=3.0, free_replays=3, awp_gamma=0.02,
                            mix_ratio=0.25, label_smoothing=0.1)
    assert build_objective("trades", options).beta == 2.0
    assert build_objective("mart", options).beta == 3.0
    assert build_objective("free", options).replays == 3
    awp = build_objective("awp-trades", options)
    assert (awp.name, awp.gamma, awp.inner.beta) == ("awp-trades", 0.02, 2.0)
    assert build_objective("pgd-mix", options).ratio == 0.25
    assert build_objective("awp-pgd", options).inner.label_smoothing == 0.1


def test_plain_objective_options_get_the_paper_defaults():
    settings = method_options(ObjectiveOptions(THREAT, attack_steps=4, seed=3))
    assert (settings.attack_steps, settings.seed) == (4, 3)
    assert (settings.trades_beta, settings.mart_beta, settings.free_replays, settings.awp_gamma) == \
        (6.0, 6.0, 8, 5e-3)


@pytest.mark.parametrize(("name", "field", "value", "message"), [
    ("trades", "trades_beta", -1.0, "trades beta must be a finite number >= 0, got -1.0"),
    ("mart", "mart_beta", float("nan"), "mart beta must be a finite number >= 0, got nan"),
    ("free", "free_replays", 0, "free replays must be an integer >= 1, got 0"),
    ("awp-pgd", "awp_gamma", -0.1, "awp gamma must be a finite number >= 0, got -0.1"),
    ("pgd-mix", "mix_ratio", 1.5, r"mix ratio must be in \[0, 1\].*got 1.5"),
    ("trades", "label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\), got 1.0"),
])
def test_bad_settings_are_refused_with_the_value_and_the_allowed_range(name, field, value, message):
    with pytest.raises(ConfigError, match=message):
        build_objective(name, MethodOptions(THREAT, **{field: value}))


# -- learning on a tiny problem ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_loss_is_finite_and_decreases(name):
    # Prepare
    x, y = _tiny_problem()
    model = _mlp()
    objective = build_objective(name, MethodOptions(THREAT, attack_steps=3, free_replays=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    # Execute: 20 batches, each replayed as the objective asks
    losses = []
    for _ in range(20):
        for _ in range(objective.replays):
            losses.append(_replay(objective, model, optimizer, x, y))
    # Assert
    assert all(torch.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0]


# -- TRADES ------------------------------------------------------------------------------------

def test_trades_loss_matches_a_hand_computation_on_a_fixed_perturbation():
    # Prepare
    model = _fixed_linear()
    x, x_adv, y = _two_examples()
    trades = build_objective("trades", MethodOptions(THREAT, trades_beta=6.0))
    # Execute
    loss = trades.loss_on(model, x, y, x_adv)
    # Assert: CE(clean) + 6 * mean_i sum_k p_ik (log p_ik - log q_ik)
    w, b = model.weight.detach(), model.bias.detach()
    p = _softmax_by_hand(x @ w.T + b)
    q = _softmax_by_hand(x_adv @ w.T + b)
    ce = -(torch.log(p[0, 0]) + torch.log(p[1, 2])) / 2
    kl_0 = sum(p[0, k] * (torch.log(p[0, k]) - torch.log(q[0, k])) for k in range(3))
    kl_1 = sum(p[1, k] * (torch.log(p[1, k]) - torch.log(q[1, k])) for k in range(3))
    assert torch.allclose(loss, ce + 6.0 * (kl_0 + kl_1) / 2, rtol=1e-12)


def test_trades_trains_on_the_points_of_its_kl_attack():
    model = _mlp()
    x, y = _tiny_problem(8)
    trades = build_objective("trades", MethodOptions(THREAT, attack_steps=4, seed=7))
    attack = KLAttack(THREAT, steps=4)
    loss = trades(model, x, y)
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, trades.loss_on(model, x, y, x_adv))


@pytest.mark.parametrize("dropout", [False, True])
def test_trades_passes_the_clean_batch_once_when_the_model_runs_alike_in_both_modes(dropout):
    # Prepare: a model of plain layers, and one with a dropout (which must keep the paper's passes)
    torch.manual_seed(0)
    layers = [nn.Linear(10, 32), nn.ReLU()] + ([nn.Dropout(0.0)] if dropout else []) + [nn.Linear(32, 3)]
    model = nn.Sequential(*layers).train()
    x, y = _tiny_problem(8)
    trades = build_objective("trades", MethodOptions(THREAT, attack_steps=4))
    calls, stop = record_modes_of_passes(model)
    # Execute
    try:
        trades(model, x, y)
    finally:
        stop()
    # Assert: the attack's steps in eval mode; the clean pass in eval mode too only with the dropout
    expected = [False] + [False] * 4 + [True, True] if dropout else [True] + [False] * 4 + [True]
    assert calls == expected


def test_trades_with_one_clean_pass_trains_to_the_weights_of_the_papers_passes(monkeypatch):
    # Prepare: small-cnn, trained with channels_last (the CPU default, whose layout hook must not
    # count as mode-dependent), twice: the second time made to take the paper's passes
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))
    split = Split(x, y)
    passes = []

    def train() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("small-cnn", (1, 8, 8), 3)
        calls, stop = record_modes_of_passes(model)
        objective = build_objective("trades", MethodOptions(THREAT, attack_steps=3))
        config = TrainConfig(objective="trades", epochs=2, batch_size=16, early_stopping=False)
        try:
            Trainer(model, objective, config, threat=THREAT, show_progress=False).fit(split, split.head(16))
        finally:
            stop()
        passes.append(len(calls))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    one_pass = train()
    monkeypatch.setattr("fortify.training.trades.runs_alike_in_both_modes", lambda model: False)
    paper = train()
    # Assert: one pass fewer per batch (3 batches, 2 epochs), and the same weights to rounding
    assert passes[1] - passes[0] == 6
    for name, weights in one_pass.items():
        assert torch.allclose(weights, paper[name], rtol=0, atol=1e-6), name


def test_kl_attack_stays_in_the_threat_model_and_raises_the_kl_above_its_start():
    # Prepare
    model = _mlp()
    x, y = _tiny_problem(64)
    attack = KLAttack(THREAT, steps=10)
    # Execute
    x_adv = attack(model, x, y)
    start = THREAT.project(x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), x)
    # Assert
    with torch.no_grad():
        clean = F.log_softmax(model(x), 1)

        def kl(points):
            return F.kl_div(F.log_softmax(model(points), 1), clean, log_target=True, reduction="sum")

        assert THREAT.contains(x_adv, x).all()
        assert kl(x_adv) > 100 * kl(start)
        assert torch.allclose((x_adv - x).abs().amax(1), torch.full((64,), THREAT.eps), atol=1e-6)


def test_kl_attack_matches_torchattacks_tpgd_from_the_same_start():
    torchattacks = pytest.importorskip("torchattacks")
    # Prepare: the same seed gives both the same 0.001 * N(0, 1) start. In float64, because the first
    # step's gradient is tiny there and float32's rounding flips the sign of a few of its coordinates,
    # differently for the two ways of computing it.
    model = _mlp(features=16).double().eval()
    x = 0.1 + 0.8 * torch.rand(32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(32, dtype=torch.long)
    ours = KLAttack(THREAT, steps=5, step_size=0.01)
    reference = torchattacks.TPGD(model, eps=THREAT.eps, alpha=0.01, steps=5)
    # Execute
    x_ours = ours(model, x, y, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    x_reference = reference(x, y)
    # Assert
    assert torch.allclose(x_ours, x_reference, atol=1e-12)


# -- MART --------------------------------------------------------------------------------------

def test_mart_loss_matches_a_hand_computation_on_a_fixed_perturbation():
    # Prepare
    model = _fixed_linear()
    x, x_adv, y = _two_examples()
    mart = build_objective("mart", MethodOptions(THREAT, mart_beta=5.0))
    # Execute
    loss = mart.loss_on(model, x, y, x_adv)
    # Assert: BCE on x_adv + 5 * mean_i KL_i * (1 - p_i,y_i)
    w, b = model.weight.detach(), model.bias.detach()
    p = _softmax_by_hand(x @ w.T + b)
    q = _softmax_by_hand(x_adv @ w.T + b)
    strongest_wrong_0 = torch.maximum(q[0, 1], q[0, 2])  # y_0 = 0
    strongest_wrong_1 = torch.maximum(q[1, 0], q[1, 1])  # y_1 = 2
    bce = (-torch.log(q[0, 0]) - torch.log(1.0001 - strongest_wrong_0 + 1e-12)
           - torch.log(q[1, 2]) - torch.log(1.0001 - strongest_wrong_1 + 1e-12)) / 2
    kl_0 = sum(p[0, k] * (torch.log(p[0, k]) - torch.log(q[0, k])) for k in range(3))
    kl_1 = sum(p[1, k] * (torch.log(p[1, k]) - torch.log(q[1, k])) for k in range(3))
    weighted = (kl_0 * (1 - p[0, 0]) + kl_1 * (1 - p[1, 2])) / 2
    assert torch.allclose(loss, bce + 5.0 * weighted, rtol=1e-12)


# -- clean/adversarial mix ---------------------------------------------------------------------

def test_pgd_mix_weighs_the_clean_and_the_adversarial_loss_by_the_ratio():
    model = _mlp()
    x, y = _tiny_problem(16)
    mix = build_objective("pgd-mix", MethodOptions(THREAT, attack_steps=3, mix_ratio=0.3, seed=2))
    x_adv = PGD(THREAT, steps=3, keep_first_success=False)(model, x, y,
                                                          generator=torch.Generator().manual_seed(2))
    expected = 0.7 * F.cross_entropy(model(x), y) + 0.3 * F.cross_entropy(model(x_adv), y)
    assert torch.allclose(mix(model, x, y), expected)


def test_pgd_mix_at_the_ends_is_clean_training_or_pgd_training():
    model = _mlp()
    x, y = _tiny_problem(16)
    clean_only = build_objective("pgd-mix", MethodOptions(THREAT, mix_ratio=0.0))
    adversarial_only = build_objective("pgd-mix", MethodOptions(THREAT, attack_steps=3, mix_ratio=1.0))
    pgd = build_objective("pgd", ObjectiveOptions(THREAT, attack_steps=3))
    assert torch.equal(clean_only(model, x, y), F.cross_entropy(model(x), y))
    assert not clean_only.adversarial
    assert torch.equal(adversarial_only(model, x, y), pgd(model, x, y))


# -- Free AT -----------------------------------------------------------------------------------

def _free_trainer(n: int, **settings) -> tuple[Trainer, Split]:
    """One epoch of Free AT (m = 3) in batches of 8 for a linear model, and its ``n`` training examples."""
    x, y = _tiny_problem(n, features=64, classes=10)
    torch.manual_seed(0)
    model = build_model("linear", (1, 8, 8), 10)
    config = TrainConfig(objective="free", epochs=1, batch_size=8, val_attack_steps=1,
                         early_stopping=False, schedule="constant", **settings)
    objective = build_objective("free", MethodOptions(THREAT, free_replays=3))
    return (Trainer(model, objective, config, threat=THREAT, show_progress=False),
            Split(x.reshape(n, 1, 8, 8), y))


def test_free_does_m_optimiser_steps_per_batch_in_the_trainer():
    # Prepare: 2 batches of 8, m = 3
    trainer, train = _free_trainer(16)
    steps = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or original_step(*a, **k)
    # Execute
    trainer.fit(train, train)
    # Assert
    assert len(steps) == 2 * 3


def test_free_records_the_mean_loss_over_its_replays():
    # Prepare: 1 batch of 8, m = 3; the objective's losses are recorded as the Trainer gets them
    trainer, train = _free_trainer(8, lr=0.5)
    losses = []

    class Recording(type(trainer.objective)):
        def __call__(self, *args, **kwargs):
            loss = super().__call__(*args, **kwargs)
            losses.append(float(loss.detach()))
            return loss
    trainer.objective.__class__ = Recording
    # Execute
    record = trainer.fit(train, train).history[0]
    # Assert: three replays whose losses differ (each follows an optimiser step); the epoch's loss is
    # their mean, not the last one
    assert len(losses) == 3 and len(set(losses)) == 3
    assert record.train_loss == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_free_carries_delta_across_replays_and_into_the_next_batch():
    # Prepare
    model = _mlp()
    x, y = _tiny_problem(16)
    x_next = torch.rand(16, 10, generator=torch.Generator().manual_seed(5))
    free = FreeObjective(ObjectiveOptions(THREAT), replays=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    grads = []
    # Execute: batch 1 twice, then the next batch once, each input gradient taken beforehand
    deltas = []
    for batch in (x, x, x_next):
        point = THREAT.project(batch + (0 if free.delta is None else free.delta), batch)
        grads.append(_input_gradient(model, point, y))
        seen.clear()
        _replay(free, model, optimizer, batch, y)
        deltas.append(free.delta.clone())
        assert torch.equal(seen[0], point)  # the input: x + delta clipped to the box
    # Assert: Shafahi et al.'s rule, delta <- clip(delta + eps * sign(g), -eps, eps), box ignored
    expected = torch.zeros_like(x)
    for grad, delta in zip(grads, deltas, strict=True):
        expected = (expected + THREAT.eps * grad.sign()).clamp(-THREAT.eps, THREAT.eps)
        assert torch.equal(delta, expected)
    assert not torch.equal(deltas[0], deltas[1])
    outside = (x + deltas[0] < 0) | (x + deltas[0] > 1)
    assert outside.any()  # the carried delta keeps what the box clipped off the input


def test_free_l2_scales_the_carried_delta_back_onto_the_ball():
    threat = ThreatModel("l2", 0.5)
    model = _mlp()
    x, y = _tiny_problem(16)
    x[:, 0] = 0.0  # an ascent step that leaves the box in the first feature is clipped only at the input
    free = FreeObjective(ObjectiveOptions(threat), replays=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = [_input_gradient(model, x, y)]
    _replay(free, model, optimizer, x, y)
    first = free.delta.clone()
    grads.append(_input_gradient(model, threat.project(x + first, x), y))
    _replay(free, model, optimizer, x, y)
    unit = [g / g.norm(dim=1, keepdim=True) for g in grads]
    assert torch.allclose(first, 0.5 * unit[0], atol=1e-6)
    assert (first[:, 0] < 0).any()
    summed = first + 0.5 * unit[1]
    expected = summed * (0.5 / summed.norm(dim=1, keepdim=True)).clamp(max=1.0)
    assert torch.allclose(free.delta, expected, atol=1e-6)


def _input_gradient(model, point, y):
    point = point.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(point), y), point)
    return grad


def test_free_resizes_delta_for_smaller_and_larger_batches():
    model = _mlp()
    x, y = _tiny_problem(16)
    free = FreeObjective(ObjectiveOptions(THREAT), replays=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    _replay(free, model, optimizer, x[:8], y[:8])
    carried = free.delta.clone()
    _replay(free, model, optimizer, x[:4], y[:4])  # a short last batch updates the first rows only
    assert torch.equal(free.delta[4:], carried[4:])
    _replay(free, model, optimizer, x, y)  # a larger batch: the new rows started from zero
    assert free.delta.shape == x.shape
    assert free.delta.abs().amax() <= THREAT.eps + 1e-7


# -- AWP ---------------------------------------------------------------------------------------

def _awp_setting(name="awp-pgd", gamma=0.01):
    model = _mlp()
    x, y = _tiny_problem(16)
    objective = build_objective(name, MethodOptions(THREAT, attack_steps=3, awp_gamma=gamma))
    return model, x, y, objective


@pytest.mark.parametrize("name", ["awp-pgd", "awp-trades"])
def test_awp_restores_the_weights_exactly_after_the_backward_pass(name):
    # Prepare
    model, x, y, awp = _awp_setting(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    loss = awp(model, x, y)
    during = {k: v.clone() for k, v in model.state_dict().items()}
    loss.backward()
    awp.after_backward(model)
    # Assert: kernels moved by gamma * their norm, biases untouched, all restored bit-exact
    for key in ("0.weight", "2.weight"):
        moved = (during[key] - before[key]).norm() / before[key].norm()
        assert torch.isclose(moved, torch.tensor(0.01), rtol=1e-4)
    assert torch.equal(during["0.bias"], before["0.bias"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_awp_steps_the_true_weights_with_the_gradient_at_the_perturbed_ones():
    # Prepare
    model, x, y, awp = _awp_setting("awp-pgd", gamma=0.02)
    reference = copy.deepcopy(model)
    x_adv = awp.inner.attack(model, x, y, generator=torch.Generator().manual_seed(0))
    grads_at_w = torch.autograd.grad(F.cross_entropy(reference(x_adv), y),
                                     [p for _, p in perturbable(reference)])
    with torch.no_grad():  # v = gamma * ||w|| * g / ||g|| per kernel, by hand
        for (_, weight), grad in zip(perturbable(reference), grads_at_w):
            weight.add_(0.02 * weight.norm() * grad / grad.norm())
    expected_grads = torch.autograd.grad(F.cross_entropy(reference(x_adv), y),
                                         list(reference.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    # Execute
    _replay(awp, model, optimizer, x, y)
    # Assert: w <- w - lr * grad L(w + v)
    for old, new, grad in zip(before, model.parameters(), expected_grads):
        assert torch.allclose(new, old - 0.5 * grad, atol=1e-6)


def test_awp_under_autocast_takes_the_loss_at_the_perturbed_weights():
    # autocast caches the bf16 copy of each weight for its whole region: a perturbation written into
    # the fp32 weights after the attack's passes cast them must still reach the loss
    model, x, y, awp = _awp_setting("awp-pgd", gamma=0.5)
    pgd = awp.inner
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd.craft(model, x, y)
        at_w = pgd.loss_on(model, x, y, x_adv).item()
        awp._perturb(model, awp.weight_perturbation(model, x, y, x_adv))
        at_w_plus_v = pgd.loss_on(model, x, y, x_adv).item()
        awp.restore()
        back_at_w = pgd.loss_on(model, x, y, x_adv).item()
    assert at_w_plus_v > at_w + 0.01  # the ascent direction raised the loss
    assert back_at_w == at_w  # and the restored weights are used again


def test_awp_perturbation_has_no_memory_of_earlier_batches():
    # Prepare: one full step on a first batch, then the perturbation for a second one
    model, x, y, awp = _awp_setting("awp-pgd", gamma=0.02)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _replay(awp, model, optimizer, x[:8], y[:8])
    x_adv = (x[8:] + 0.05).clamp(0, 1)
    grads = torch.autograd.grad(F.cross_entropy(model(x_adv), y[8:]),
                                [p for _, p in perturbable(model)])
    # Execute
    perturbation = awp.weight_perturbation(model, x[8:], y[8:], x_adv)
    # Assert: v = gamma * ||w|| * g / ||g|| per kernel from this batch's gradient alone, as the
    # authors' plain-SGD proxy step gives (a proxy optimiser with momentum would mix in the first
    # batch's gradient)
    for (name, weight), grad in zip(perturbable(model), grads, strict=True):
        expected = 0.02 * weight.detach().norm() * grad / grad.norm()
        assert torch.allclose(perturbation[name], expected, atol=1e-7), name


def test_awp_leaves_the_model_batchnorm_statistics_to_the_training_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _tiny_problem(16)
    awp = AWPObjective(build_pgd(MethodOptions(THREAT, attack_steps=3)))
    awp(model, x, y).backward()
    awp.after_backward(model)
    # one training forward pass: num_batches_tracked counts it, the proxy's pass is not counted
    assert int(model[1].num_batches_tracked) == 1


# -- eps warm-up -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_eps_warm_up_reaches_every_method(name):
    model = _mlp()
    x, y = _tiny_problem(16)
    objective = build_objective(name, MethodOptions(THREAT, attack_steps=2, mix_ratio=1.0,
                                                    free_replays=1))
    objective.set_eps(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    _replay(objective, model, optimizer, x, y)
    _replay(objective, model, optimizer, x, y)
    furthest = max(float((points - x).abs().amax()) for points in seen if points.shape == x.shape)
    assert 0.0 < furthest <= 0.01 + 1e-6


# -- robustness band on digits -----------------------------------------------------------------

def _train_on_digits(digits, objective: str, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    threat = ThreatModel("linf", 0.2)
    config = TrainConfig(objective=objective, epochs=epochs, early_stopping=False, attack_steps=5)
    trainer = Trainer(model, build_objective(objective, MethodOptions(threat, attack_steps=5)),
                      config, threat=threat, show_progress=False)
    trainer.fit(digits.train, digits.val)
    return model.eval()


@pytest.mark.slow
def test_trades_and_pgd_training_both_beat_standard_training_under_pgd_20(
        digits, standard_model, robust_model, record_property):
    # Prepare: TRADES with the settings of the PGD-AT fixture (10 epochs, 5 steps, eps 0.2)
    trades_model = _train_on_digits(digits, "trades", epochs=10)
    x, y = digits.test.x, digits.test.y
    attack = PGD(ThreatModel("linf", 0.2), steps=20, seed=0)

    def robust_accuracy(model):
        return float((model(attack(model, x, y)).argmax(1) == y).float().mean())

    # Execute
    accuracies = {name: robust_accuracy(model) for name, model in
                  [("standard", standard_model), ("pgd", robust_model), ("trades", trades_model)]}
    for name, value in accuracies.items():
        record_property(f"pgd20_robust_accuracy_{name}", value)
    # Assert
    assert accuracies["trades"] >= accuracies["standard"] + 0.3
    assert accuracies["pgd"] >= accuracies["standard"] + 0.3


def _trained_weights(objective_name: str, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.rand(48, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))
    split = Split(x, y)
    objective = build_objective(objective_name, MethodOptions(THREAT, attack_steps=3, **options))
    config = TrainConfig(objective=objective_name, epochs=2, batch_size=16, early_stopping=False)
    Trainer(model, objective, config, threat=THREAT, show_progress=False).fit(split, split.head(16))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_awp_warm_up_trains_exactly_the_wrapped_objective_until_it_ends():
    # Prepare / Execute: two epochs of PGD-AT, and of AWP-PGD with a warm-up of 2, 1 and 0 epochs
    pgd = _trained_weights("pgd")
    warm_all = _trained_weights("awp-pgd", awp_gamma=0.05, awp_warmup_epochs=2)
    warm_one = _trained_weights("awp-pgd", awp_gamma=0.05, awp_warmup_epochs=1)
    warm_none = _trained_weights("awp-pgd", awp_gamma=0.05, awp_warmup_epochs=0)
    # Assert: a warm-up covering the run is PGD-AT bit for bit; a shorter one is not, and differs
    # from no warm-up as well
    assert all(torch.equal(pgd[k], warm_all[k]) for k in pgd)
    assert not all(torch.equal(pgd[k], warm_one[k]) for k in pgd)
    assert not all(torch.equal(warm_one[k], warm_none[k]) for k in pgd)


def test_awp_warm_up_must_not_be_negative():
    with pytest.raises(ConfigError, match="awp warmup_epochs"):
        build_objective("awp-pgd", MethodOptions(THREAT, awp_warmup_epochs=-1))
