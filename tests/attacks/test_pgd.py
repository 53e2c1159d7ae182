"""FGSM and PGD: closed-form worst cases, invariants, reproducibility, and parity with torchattacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fortify.attacks import FGSM, PGD
from fortify.attacks.adaptive import MarginPGD, logit_margin
from fortify.config import EvalConfig
from fortify.errors import ConfigError, DataError
from fortify.pipeline import build_attacks
from fortify.threat import ThreatModel

EPS = 0.2


def _two_class_linear(features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(features, 2)
    return model.double()


def _worst_case_loss_linf(model: nn.Linear, x, y, eps, bounds=(0.0, 1.0)):
    """Exact maximum of the CE loss over the L-inf ball intersected with the box.

    For two classes the loss is softplus(-margin) with margin = d.x + c, d = w_y - w_other.
    The box and the ball are both products of intervals, so each coordinate moves on its own
    against sign(d), as far as the ball and the box allow.
    """
    w, b = model.weight.detach(), model.bias.detach()
    d = w[y] - w[1 - y]
    c = b[y] - b[1 - y]
    x_star = (x - eps * d.sign()).clamp(*bounds)
    x_star = torch.maximum(torch.minimum(x_star, x + eps), x - eps)
    return F.softplus(-((d * x_star).sum(1) + c))


def _worst_case_loss_l2(model: nn.Linear, x, y, eps):
    """Exact maximum over the L2 ball (no box contact): the margin drops by eps * ||d||_2."""
    w, b = model.weight.detach(), model.bias.detach()
    d = w[y] - w[1 - y]
    margin = (d * x).sum(1) + (b[y] - b[1 - y])
    return F.softplus(-(margin - eps * d.norm(dim=1)))


def _loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def test_pgd_linf_reaches_the_closed_form_worst_case_on_a_linear_model():
    # Prepare
    model = _two_class_linear(20)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (64,), generator=gen)
    attack = PGD(ThreatModel("linf", 0.1), steps=50, step_size=0.01, keep_first_success=False)
    # Execute
    x_adv = attack(model, x, y)
    # Assert
    expected = _worst_case_loss_linf(model, x, y, 0.1)
    assert torch.allclose(_loss(model, x_adv, y), expected, rtol=1e-3)


def test_pgd_l2_reaches_the_closed_form_worst_case_on_a_linear_model():
    model = _two_class_linear(20)
    gen = torch.Generator().manual_seed(2)
    x = 0.4 + 0.2 * torch.rand(64, 20, generator=gen, dtype=torch.float64)  # far from the box faces
    y = torch.randint(0, 2, (64,), generator=gen)
    attack = PGD(ThreatModel("l2", 0.25), steps=50, step_size=0.05, keep_first_success=False)
    x_adv = attack(model, x, y)
    expected = _worst_case_loss_l2(model, x, y, 0.25)
    assert torch.allclose(_loss(model, x_adv, y), expected, rtol=1e-3)
    assert torch.allclose((x_adv - x).norm(dim=1), torch.full((64,), 0.25, dtype=torch.float64))


def test_fgsm_is_exact_for_linf_on_a_linear_model_without_box_contact():
    model = _two_class_linear(10)
    x = 0.3 + 0.4 * torch.rand(32, 10, dtype=torch.float64)
    y = torch.randint(0, 2, (32,))
    x_adv = FGSM(ThreatModel("linf", 0.1))(model, x, y)
    assert torch.allclose(_loss(model, x_adv, y), _worst_case_loss_linf(model, x, y, 0.1))


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 1.0)])
def test_points_stay_in_the_threat_model_and_robust_is_at_most_clean(standard_model, digits, norm, eps):
    threat = ThreatModel(norm, eps)
    x, y = digits.test.x, digits.test.y
    clean = (standard_model(x).argmax(1) == y).float().mean()
    for attack in (FGSM(threat), PGD(threat, steps=10), PGD(threat, steps=10, restarts=2)):
        x_adv = attack(standard_model, x, y)
        assert threat.contains(x_adv, x).all()
        assert (standard_model(x_adv).argmax(1) == y).float().mean() <= clean


def test_more_pgd_steps_never_do_worse_than_fgsm(standard_model, digits):
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x, digits.test.y

    def accuracy(attack):
        return (standard_model(attack(standard_model, x, y)).argmax(1) == y).float().mean()

    fgsm, pgd10, pgd40 = accuracy(FGSM(threat)), accuracy(PGD(threat, steps=10)), accuracy(
        PGD(threat, steps=40))
    assert pgd40 <= pgd10 <= fgsm
    assert pgd10 < fgsm  # on a standard model iteration clearly helps at this eps


def test_early_stop_returns_the_same_points(standard_model, digits):
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:200], digits.test.y[:200]
    full = PGD(threat, steps=20, restarts=2)(standard_model, x, y)
    early = PGD(threat, steps=20, restarts=2, early_stop=True)(standard_model, x, y)
    assert torch.allclose(full, early, atol=1e-6)
    assert torch.equal(standard_model(full).argmax(1), standard_model(early).argmax(1))


def test_the_probe_finds_the_closed_form_corner_on_a_linear_model():
    # A two-class linear model's loss gradient points along -sign(w_y - w_other) everywhere, so the
    # probe from the clean input is the exact worst case of the L-inf ball: with one tiny PGD step
    # the attack fools exactly the examples whose worst-case margin is negative. A probe stepped from
    # the random start would stop short of the corner wherever the start pointed the other way.
    model = _two_class_linear(20)
    gen = torch.Generator().manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(256, 20, generator=gen, dtype=torch.float64)  # no box contact
    y = torch.randint(0, 2, (256,), generator=gen)
    threat = ThreatModel("linf", 0.05)
    w, b = model.weight.detach(), model.bias.detach()
    d = w[y] - w[1 - y]
    worst_margin = (d * x).sum(1) + (b[y] - b[1 - y]) - 0.05 * d.abs().sum(1)
    fooled = {}
    for probe in (False, True):
        x_adv = PGD(threat, steps=1, step_size=1e-6, probe=probe)(model, x, y)
        assert threat.contains(x_adv, x).all()
        fooled[probe] = model(x_adv).argmax(1) != y
    assert torch.equal(fooled[True], worst_margin < 0)
    assert int(fooled[True].sum()) > int(fooled[False].sum()) + 20


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("early_stop", [False, True])
def test_the_probe_only_adds_fooled_examples(standard_model, digits, norm, eps, early_stop):
    # Same seed, one restart: an example the probe does not fool walks through the same iterates as
    # without it, so the points differ only where the probe's corner fooled the model (some of which
    # PGD would have fooled a step or two later, at another point).
    threat = ThreatModel(norm, eps)
    x, y = digits.test.x[:200], digits.test.y[:200]
    settings = {"steps": 3, "step_size": eps / 10, "early_stop": early_stop}
    plain = PGD(threat, **settings)(standard_model, x, y)
    probed = PGD(threat, probe=True, **settings)(standard_model, x, y)
    with torch.no_grad():
        fooled_plain = standard_model(plain).argmax(1) != y
        fooled_probed = standard_model(probed).argmax(1) != y
    assert threat.contains(probed, x).all()
    assert bool((fooled_probed | ~fooled_plain).all()), "the probe lost an example PGD had fooled"
    assert int(fooled_probed.sum()) > int(fooled_plain.sum())  # 3 short steps cannot cross the ball
    changed = (probed != plain).flatten(1).any(1)
    assert bool(changed.any()) and bool(fooled_probed[changed].all())


def test_the_targeted_probe_only_adds_examples_that_reach_their_target(standard_model, digits):
    threat = ThreatModel("linf", 0.15)
    x, y = digits.test.x[:200], digits.test.y[:200]
    target = (y + 1) % 10
    settings = {"steps": 3, "step_size": 0.015, "targeted": True, "early_stop": True}
    with torch.no_grad():
        hit = {probe: standard_model(PGD(threat, probe=probe, **settings)(standard_model, x, y, target=target)
                                     ).argmax(1) == target for probe in (False, True)}
    assert bool((hit[True] | ~hit[False]).all())
    assert int(hit[True].sum()) > int(hit[False].sum())


def test_with_early_stop_the_probe_saves_passes_on_a_model_that_falls_to_fgsm(standard_model, digits):
    threat = ThreatModel("linf", 0.2)
    x, y = digits.test.x, digits.test.y
    rows = {}
    for probe in (False, True):
        counted = _RowCounter(standard_model)
        PGD(threat, steps=10, early_stop=True, probe=probe)(counted, x, y)
        rows[probe] = counted.rows
    # the probe's own forward costs one pass; the examples it fools skip the several steps of size
    # 2.5 * eps / 10 that crossing the ball takes
    assert rows[True] < 0.8 * rows[False]


def test_evaluation_runs_pgd_with_early_stop_and_the_probe_unless_told_otherwise():
    threat = ThreatModel("linf", 0.1)
    (default,) = build_attacks(EvalConfig(attacks=["pgd"]), threat, num_classes=10)
    (off,) = build_attacks(EvalConfig(attacks=["pgd"], attack_options={"pgd": {"probe": False}}),
                           threat, num_classes=10)
    assert isinstance(default, PGD) and default.early_stop and default.probe
    assert isinstance(off, PGD) and off.early_stop and not off.probe
    assert default.describe()["probe"] is True  # part of the settings a journal and a report keep


class _RowCounter(nn.Module):
    """Counts the examples pushed through the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows, self.calls = inner, 0, 0

    def forward(self, x):
        self.rows += x.shape[0]
        self.calls += 1
        return self.inner(x)


def test_one_restart_returns_each_first_hit_or_the_final_iterate_without_judging_the_last_one():
    # A reference loop written out here: sign steps from the clean input, projected; each example
    # keeps its first fooling iterate, else the final one. The attack must return the same points in
    # `steps` forward passes: judging the final iterate would add one and change no answer.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    gen = torch.Generator().manual_seed(6)
    x = 0.2 + 0.6 * torch.rand(128, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (128,), generator=gen)
    threat, steps, alpha = ThreatModel("linf", 0.15), 6, 0.04
    point, answer = x.clone(), torch.full_like(x, float("nan"))
    for _ in range(steps):
        point.requires_grad_(True)
        logits = model(point)
        new = (logits.argmax(1) != y) & answer.isnan().all(1)
        answer[new] = point.detach()[new]
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), point)
        point = threat.project(point.detach() + alpha * grad.sign(), x)
    unanswered = answer.isnan().all(1)
    answer[unanswered] = point[unanswered]
    counted = _RowCounter(model)
    x_adv = PGD(threat, steps=steps, step_size=alpha, random_start=False)(counted, x, y)
    assert torch.allclose(x_adv, answer, atol=1e-12)
    assert counted.calls == steps


def test_restarts_keep_the_per_example_worst_case(robust_model, digits):
    threat = ThreatModel("linf", EPS)
    x, y = digits.test.x, digits.test.y
    one = robust_model(PGD(threat, steps=5, restarts=1)(robust_model, x, y)).argmax(1) != y
    three = robust_model(PGD(threat, steps=5, restarts=3)(robust_model, x, y)).argmax(1) != y
    assert bool((three | ~one).all()), "an example fooled by the first restart was lost"


def test_restarts_give_an_unfooled_example_the_highest_loss_point(robust_model, digits):
    # the first of three restarts draws what a single restart draws (same seed), so where no restart
    # fools an example its returned point has at least the single restart's loss, and more somewhere
    threat = ThreatModel("linf", EPS)
    x, y = digits.test.x, digits.test.y
    points = {k: PGD(threat, steps=5, restarts=k)(robust_model, x, y) for k in (1, 3)}
    with torch.no_grad():
        logits = {k: robust_model(p) for k, p in points.items()}
        loss = {k: F.cross_entropy(v, y, reduction="none") for k, v in logits.items()}
    unfooled = (logits[3].argmax(1) == y) & (logits[1].argmax(1) == y)
    assert int(unfooled.sum()) > 10
    assert bool((loss[3][unfooled] >= loss[1][unfooled] - 1e-6).all())
    assert bool((loss[3][unfooled] > loss[1][unfooled] + 1e-6).any())


def test_targeted_pgd_reaches_the_target(standard_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]
    target = (y + 1) % 10
    attack = PGD(ThreatModel("linf", 0.3), steps=30, targeted=True)
    x_adv = attack(standard_model, x, y, target=target)
    hit = (standard_model(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.9
    with pytest.raises(ConfigError, match="targeted"):
        attack(standard_model, x, y)


def test_seeded_reproducible_and_restores_mode(standard_model, digits):
    x, y = digits.test.x[:50], digits.test.y[:50]
    threat = ThreatModel("linf", 0.1)
    standard_model.train()
    try:
        a = PGD(threat, steps=3, seed=7)(standard_model, x, y)
        assert standard_model.training, "the caller's train mode was not restored"
    finally:
        standard_model.eval()
    b = PGD(threat, steps=3, seed=7)(standard_model, x, y)
    c = PGD(threat, steps=3, seed=8)(standard_model, x, y)
    assert not standard_model.training
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_and_device_are_kept():
    model = _two_class_linear(6)
    x = torch.rand(4, 6, dtype=torch.float64)
    x_adv = PGD(ThreatModel("l2", 0.5), steps=2)(model, x, torch.zeros(4, dtype=torch.long))
    assert x_adv.dtype == torch.float64 and x_adv.device == x.device and not x_adv.requires_grad


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"restarts": 0}, {"step_size": -1.0},
                                    {"early_stop": True, "keep_first_success": False},
                                    {"probe": True, "keep_first_success": False}])
def test_bad_pgd_settings(kwargs):
    with pytest.raises(ConfigError):
        PGD(ThreatModel("linf", 0.1), **kwargs)


def test_bad_batches_are_rejected():
    model = _two_class_linear(3).float()
    attack = PGD(ThreatModel("linf", 0.1), steps=1)
    with pytest.raises(DataError, match="labels must have shape"):
        attack(model, torch.rand(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="outside the declared box"):
        attack(model, torch.rand(4, 3) + 1, torch.zeros(4, dtype=torch.long))


# -- parity with torchattacks ------------------------------------------------------------------

def _accuracy(model, x_adv, y):
    return float((model(x_adv).argmax(1) == y).float().mean())


def test_pgd_without_random_start_equals_torchattacks_step_for_step(standard_model, digits):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits.test.x, digits.test.y
    eps, alpha, steps = 0.1, 0.02, 10
    theirs = torchattacks.PGD(standard_model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = PGD(ThreatModel("linf", eps), steps=steps, step_size=alpha, random_start=False,
               keep_first_success=False)(standard_model, x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_pgd_robust_accuracy_within_one_point_of_torchattacks(robust_model, digits, eps):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits.test.x, digits.test.y
    steps, alpha = 20, 2.5 * eps / 20
    torch.manual_seed(0)
    theirs = torchattacks.PGD(robust_model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    ours = PGD(ThreatModel("linf", eps), steps=steps, step_size=alpha)(robust_model, x, y)
    acc_ours, acc_theirs = _accuracy(robust_model, ours, y), _accuracy(robust_model, theirs, y)
    assert 0.2 < acc_theirs < 0.95, "the comparison needs a model that is neither broken nor untouched"
    assert abs(acc_ours - acc_theirs) <= 0.01


def test_fgsm_equals_torchattacks(standard_model, digits):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits.test.x, digits.test.y
    theirs = torchattacks.FGSM(standard_model, eps=0.1)(x, y)
    ours = FGSM(ThreatModel("linf", 0.1))(standard_model, x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_targeted_margin_pgd_moves_towards_its_target_as_targeted_pgd_does():
    # Prepare: a 4-class linear model, targets that are not the predicted class
    torch.manual_seed(0)
    model = nn.Linear(16, 4).double()
    x = torch.rand(64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = model(x).argmax(1).detach()
    target = (y + 1) % 4
    threat = ThreatModel("linf", 0.3)
    # Execute
    plain = PGD(threat, steps=20, targeted=True)(model, x, y, target=target)
    margin = MarginPGD(threat, steps=20, targeted=True)(model, x, y, target=target)
    # Assert: the target's margin grows and the target is reached about as often as with CE
    with torch.no_grad():
        before, after = logit_margin(model(x), target), logit_margin(model(margin), target)
        hits_plain = (model(plain).argmax(1) == target).float().mean()
        hits_margin = (model(margin).argmax(1) == target).float().mean()
    assert bool((after >= before - 1e-9).all()) and after.mean() > before.mean()
    assert hits_margin >= hits_plain - 0.05 and hits_margin > 0.3


# -- the closed-form gradient of the cross-entropy ---------------------------------------------

def _five_class_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def _gradient_through_the_loss(attack, model, x, y, target):
    point = x.clone().requires_grad_(True)
    return torch.autograd.grad(attack.objective(model(point), y, target).sum(), point)[0]


@pytest.mark.parametrize("targeted", [False, True])
def test_the_closed_form_cross_entropy_gradient_equals_the_gradient_through_the_loss(targeted):
    model = _five_class_mlp()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(32, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=gen)
    target = (y + 1 + torch.randint(0, 4, (32,), generator=gen)) % 5 if targeted else None
    attack = PGD(ThreatModel("linf", 0.1), targeted=targeted)
    grad, logits = attack.gradient_and_logits(model, x.clone().requires_grad_(True), y, target)
    expected = _gradient_through_the_loss(attack, model, x, y, target)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-13) and expected.abs().max() > 1e-3
    assert torch.equal(logits.detach(), model(x).detach())


def test_an_objective_of_its_own_is_differentiated_through_its_loss():
    model = _five_class_mlp()
    x = torch.rand(32, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = model(x).argmax(1).detach()
    attack = MarginPGD(ThreatModel("linf", 0.1))
    grad, _ = attack.gradient_and_logits(model, x.clone().requires_grad_(True), y, None)
    margin = _gradient_through_the_loss(attack, model, x, y, None)
    cross_entropy = _gradient_through_the_loss(PGD(ThreatModel("linf", 0.1)), model, x, y, None)
    assert torch.allclose(grad, margin, atol=1e-13) and not torch.allclose(grad, cross_entropy, atol=1e-3)


class _AveragingModel(nn.Module):
    """Stands for EOT: its ``average_objective`` weighs the loss, which the gradient must follow."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def average_objective(self, x, loss):
        logits = self.inner(x)
        return 3.0 * loss(logits), logits


def test_a_model_that_averages_its_samples_is_differentiated_through_its_averaged_loss():
    inner = _five_class_mlp()
    x = torch.rand(32, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(7))
    attack = PGD(ThreatModel("linf", 0.1))
    grad, _ = attack.gradient_and_logits(_AveragingModel(inner), x.clone().requires_grad_(True), y, None)
    assert torch.allclose(grad, 3.0 * _gradient_through_the_loss(attack, inner, x, y, None), atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_l2_crosses_the_boundary_of_a_saturated_softmax(dtype):
    # Prepare: a linear model and points whose logit margins lie between 50 and 70, so that the
    # cross-entropy's input gradient is 1e-19 or less: its norm fell below the 1e-12 clamp (some of
    # its squares underflow in float32), and each L2 step moved by |g| / 1e-12, i.e. not at all
    torch.manual_seed(0)
    model = nn.Linear(10, 2).to(dtype)
    with torch.no_grad():
        normal = model.weight[1] - model.weight[0]
        model.weight.mul_(300.0 / normal.norm())  # |w_1 - w_0| = 300
        model.bias.copy_(-model.weight.sum(1) / 2)  # the boundary through the box's centre
    unit = ((model.weight[1] - model.weight[0]) / 300.0).detach()
    side = torch.tensor([1.0, -1.0] * 8, dtype=dtype)[:, None]
    margin = torch.linspace(50, 70, 16, dtype=dtype)[:, None]
    x = 0.5 + side * (margin / 300.0) * unit
    assert bool(((x >= 0) & (x <= 1)).all())
    y = model(x).argmax(1).detach()
    gradient = torch.autograd.functional.jacobian(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x)
    assert 0 < float(gradient.abs().max()) < 1e-19
    threat = ThreatModel("l2", 70 / 300 * 1.5)  # 1.5 times the farthest point's distance to the boundary
    # Execute
    x_adv = PGD(threat, steps=20, random_start=False)(model, x, y)
    # Assert
    assert bool((model(x_adv).argmax(1) != y).all())
    assert bool(threat.contains(x_adv, x).all())


def test_the_closed_form_logit_gradient_keeps_the_labels_entry_for_confident_rows():
    # Prepare: margins of 20 to 80 logits, where p_label rounds to 1 in float32
    from fortify.attacks.base import cross_entropy_logit_gradient

    logits = torch.zeros(7, 3)
    logits[:, 1] = torch.arange(20.0, 90.0, 10.0)
    label = torch.ones(7, dtype=torch.long)
    # Execute
    gradient = cross_entropy_logit_gradient(logits, label)
    # Assert: the exact gradient (float64, the label's entry as minus the others' sum: p - 1 cancels
    # even in float64 at these margins) to float32's relative precision; the label's entry was 0
    exact = F.softmax(logits.double(), dim=1)
    exact[:, 1] = -(exact[:, 0] + exact[:, 2])
    torch.testing.assert_close(gradient.double(), exact, rtol=1e-6, atol=0)
    assert bool((gradient[:, 1] < 0).all())
    assert bool((gradient.sum(dim=1) == 0).all())
