"""FAB and FAB-T: exact projections, closed-form minimal distances on linear models, invariants,
and parity with AutoAttack's FAB (pyautoattack)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fortify.attacks.base import ATTACKS
from fortify.attacks.fab import FAB, FABTargeted, project_onto_hyperplane_in_box
from fortify.errors import ConfigError
from fortify.models.predictions import fooled_beyond_rounding
from fortify.threat import ThreatModel

DUAL = {"l2": 2, "linf": 1}


# -- the projection onto a hyperplane inside the box ------------------------------------------

def _brute_force_projection_norm(point, normal, offset, norm):
    """Smallest ||delta|| with <normal, delta> = offset and point + delta in [0, 1], by a solver."""
    optimize = pytest.importorskip("scipy.optimize")
    d = point.size
    box = list(zip(-point, 1 - point))
    if norm == "linf":  # variables (delta, s): minimise s subject to -s <= delta_i <= s
        eye = np.eye(d)
        a_ub = np.vstack([np.hstack([eye, -np.ones((d, 1))]), np.hstack([-eye, -np.ones((d, 1))])])
        res = optimize.linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d),
                               A_eq=np.r_[normal, 0.0][None], b_eq=[offset], bounds=box + [(0, None)])
        return res.fun
    res = optimize.minimize(lambda z: z @ z, np.zeros(d), jac=lambda z: 2 * z, method="SLSQP",
                            bounds=box, options={"ftol": 1e-15, "maxiter": 500},
                            constraints=[{"type": "eq", "fun": lambda z: normal @ z - offset}])
    return float(np.sqrt(res.fun))


def _reachable(point, normal, offset):
    """Whether the hyperplane meets the box: offset lies between the extremes of <normal, delta>."""
    high = np.where(normal > 0, normal * (1 - point), -normal * point).sum()
    low = np.where(normal > 0, -normal * point, normal * (1 - point)).sum()
    return low <= offset <= high


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_exact_minimiser_inside_the_box(norm):
    # Prepare: small dimensions so that the box binds often; a few zero weights
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(60, 6, generator=gen, dtype=torch.float64)
    normals = torch.randn(60, 6, generator=gen, dtype=torch.float64)
    normals[:10, 0] = 0.0
    offsets = 0.8 * torch.randn(60, generator=gen, dtype=torch.float64)
    # Execute
    delta = project_onto_hyperplane_in_box(points, normals, offsets, (0.0, 1.0), norm)
    # Assert
    norms = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    feasible_rows = 0
    for i in range(60):
        t, w, c = points[i].numpy(), normals[i].numpy(), float(offsets[i])
        if not _reachable(t, w, c):
            # the hyperplane misses the box: every coordinate goes to the box face towards it
            corner = np.where(np.sign(c) * w > 0, 1 - t, np.where(w == 0, 0.0, -t))
            assert np.allclose(delta[i].numpy(), corner, rtol=0, atol=1e-12)
            continue
        assert float(normals[i] @ delta[i]) == pytest.approx(c, abs=1e-9)
        feasible_rows += 1
        assert bool(((points[i] + delta[i] >= -1e-12) & (points[i] + delta[i] <= 1 + 1e-12)).all())
        assert float(norms[i]) == pytest.approx(_brute_force_projection_norm(t, w, c, norm), abs=1e-6)
    assert feasible_rows >= 40, "the sample should mostly exercise the box-constrained case"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_equals_autoattacks_inside_the_box_and_where_the_hyperplane_misses_it(norm):
    # Prepare: offsets large enough that about a third of the hyperplanes miss the box
    fab_projections = pytest.importorskip("pyautoattack.fab_projections")
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(400, 6, generator=gen, dtype=torch.float64)
    normals = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    offsets = 2.5 * torch.randn(400, generator=gen, dtype=torch.float64)
    missed = sum(not _reachable(t.numpy(), w.numpy(), float(c)) for t, w, c in zip(points, normals, offsets))
    # Execute: the reference takes the hyperplane as <w, z> = b
    ours = project_onto_hyperplane_in_box(points, normals, offsets, (0.0, 1.0), norm)
    reference = {"linf": fab_projections.projection_linf, "l2": fab_projections.projection_l2}[norm]
    theirs = reference(points.clone(), normals.clone(), offsets + (normals * points).sum(1))
    # Assert
    assert 50 < missed < 350, "the sample should exercise both cases"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_along_a_vanishing_normal_stays_put(norm):
    # a flat model region: no gradient, yet a large logit gap to close
    points = torch.rand(3, 4)
    normals = torch.zeros(3, 4)
    delta = project_onto_hyperplane_in_box(points, normals, torch.tensor([1e3, -1e3, 0.0]), (0.0, 1.0), norm)
    assert torch.equal(delta, torch.zeros(3, 4))


# -- closed-form minimal distances on linear models -------------------------------------------

def _linear(features: int, classes: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(features, classes).double()


def _closed_form_distance(model: nn.Linear, x, y, norm):
    """Distance to the nearest other-class region: min_k |f_k - f_y| / ||w_k - w_y||_dual.

    For a linear model the points misclassified away from y form the union over k of the
    half-spaces f_k > f_y, so the minimal distance is the smallest distance to one of them.
    """
    logits = model(x).detach()
    gaps = (logits - logits.gather(1, y[:, None])).abs()
    normals = model.weight.detach()[None] - model.weight.detach()[y][:, None]
    dist = gaps / normals.norm(p=DUAL[norm], dim=2)
    dist[torch.arange(x.shape[0]), y] = torch.inf
    return dist.min(dim=1).values


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("targeted", [False, True])
def test_minimal_distance_equals_the_closed_form_on_a_linear_model(classes, norm, targeted):
    # Prepare: points far from the box faces, labelled by the model, so no example starts fooled
    model = _linear(20, classes)
    gen = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(64, 20, generator=gen, dtype=torch.float64)
    y = model(x).argmax(1)
    threat = ThreatModel(norm, 1.0 if norm == "l2" else 0.3)
    attack = (FABTargeted(threat, steps=20, n_target_classes=classes - 1) if targeted
              else FAB(threat, steps=20))
    # Execute
    x_adv, norms = attack.minimal(model, x, y)
    # Assert
    exact = _closed_form_distance(model, x, y, norm)
    assert bool((model(x_adv).argmax(1) != y).all())
    assert torch.allclose(norms, threat.distance(x_adv, x))
    assert bool((norms >= exact * (1 - 1e-9)).all()), "closer than the closed-form minimum"
    assert bool((norms <= exact * 1.02).all())


def test_nothing_found_gives_x_and_inf_and_a_misclassified_point_gives_zero():
    # Prepare: a bias so large that class 0 wins everywhere in the box
    model = _linear(5, 2)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([100.0, 0.0], dtype=torch.float64))
    x = torch.rand(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1])  # the last three are misclassified already
    # Execute
    x_adv, norms = FAB(ThreatModel("linf", 0.3), steps=5).minimal(model, x, y)
    # Assert
    assert torch.equal(x_adv, x)
    assert torch.equal(norms[:3], torch.full((3,), torch.inf, dtype=norms.dtype))
    assert torch.equal(norms[3:], torch.zeros(3, dtype=norms.dtype))


# -- invariants on a trained network ----------------------------------------------------------

@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.0)])
@pytest.mark.parametrize("cls", [FAB, FABTargeted])
def test_perturb_stays_inside_and_fools_exactly_where_the_minimal_norm_fits(standard_model, digits,
                                                                             norm, eps, cls):
    # Prepare
    threat = ThreatModel(norm, eps)
    x, y = digits.test.x[:150], digits.test.y[:150]
    kwargs = {"n_target_classes": 3} if cls is FABTargeted else {}
    attack = cls(threat, steps=10, **kwargs)
    # Execute
    x_adv = attack(standard_model, x, y)
    _, norms = attack.minimal(standard_model, x, y)
    # Assert: one restart from x is deterministic, so perturb fools where the minimal norm fits
    # (up to rounding that a different batch composition may cause right at eps)
    assert bool(threat.contains(x_adv, x).all())
    fooled = standard_model(x_adv).argmax(1) != y
    clear = (norms - eps).abs() > 0.01 * eps
    assert torch.equal(fooled[clear], norms[clear] <= eps)
    assert torch.equal(x_adv[~fooled], x[~fooled]), "an example not fooled must come back as x"
    clean = (standard_model(x).argmax(1) == y).float().mean()
    assert (~fooled).float().mean() < clean, "the attack should fool some correct examples"


def test_final_search_only_shrinks_the_found_points(standard_model, digits):
    # Prepare
    x, y = digits.test.x[:100], digits.test.y[:100]
    threat = ThreatModel("l2", 1.0)
    # Execute
    raw_x, raw = FAB(threat, steps=8, search_steps=0).minimal(standard_model, x, y)
    searched_x, searched = FAB(threat, steps=8).minimal(standard_model, x, y)
    # Assert
    found = torch.isfinite(raw) & (raw > 0)
    assert torch.equal(torch.isfinite(searched), torch.isfinite(raw))
    assert bool((searched <= raw).all())
    assert bool((searched[found] < raw[found]).any())
    assert bool((standard_model(searched_x[found]).argmax(1) != y[found]).all())


@pytest.mark.parametrize("cls", [FAB, FABTargeted])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_found_points_fool_the_model_beyond_rounding_in_any_batch(standard_model, digits, cls, norm):
    # Prepare: the final search walks each found point towards the boundary
    x, y = digits.test.x[:100], digits.test.y[:100]
    threat = ThreatModel(norm, 0.3 if norm == "linf" else 2.0)
    # Execute
    points, norms = cls(threat, steps=20).minimal(standard_model, x, y)
    # Assert: each point returned as found beats the label by more than rounding, so a batch of one
    # row, which runs other kernels than a batch of many, judges it adversarial too
    found = torch.isfinite(norms) & (norms > 0)
    assert int(found.sum()) > 50
    with torch.no_grad():
        logits = standard_model(points[found])
        alone = torch.cat([standard_model(point[None]) for point in points[found]])
    assert bool(fooled_beyond_rounding(logits, y[found]).all())
    assert bool((alone.argmax(1) != y[found]).all())


def test_seeded_reproducible_and_minimal_restores_mode(standard_model, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel("linf", 0.2)
    standard_model.train()
    try:
        a, norms_a = FAB(threat, steps=5, restarts=2, seed=7).minimal(standard_model, x, y)
        assert standard_model.training, "the caller's train mode was not restored"
    finally:
        standard_model.eval()
    b, norms_b = FAB(threat, steps=5, restarts=2, seed=7).minimal(standard_model, x, y)
    assert torch.equal(a, b) and torch.equal(norms_a, norms_b)
    # another seed may legitimately find the same minimal points, so only reproducibility is asserted


def test_dtype_and_device_are_kept():
    model = _linear(6, 3)
    x = 0.3 + 0.4 * torch.rand(4, 6, dtype=torch.float64)
    x_adv = FAB(ThreatModel("l2", 0.5), steps=2)(model, x, model(x).argmax(1))
    assert x_adv.dtype == torch.float64 and x_adv.device == x.device and not x_adv.requires_grad


# -- settings and registry --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"restarts": 0}, {"alpha_max": 1.5}, {"eta": 0.5},
                                    {"beta": 0.0}, {"search_steps": -1}])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        FAB(ThreatModel("linf", 0.1), **kwargs)


@pytest.mark.parametrize("n_target_classes", [0, -1, 2.5, True])
def test_n_target_classes_must_be_a_positive_integer(n_target_classes):
    with pytest.raises(ConfigError, match="n_target_classes"):
        FABTargeted(ThreatModel("linf", 0.1), n_target_classes=n_target_classes)


def test_n_target_classes_beyond_the_model_is_rejected():
    model = _linear(4, 3).float()
    x = torch.rand(2, 4)
    attack = FABTargeted(ThreatModel("linf", 0.1), n_target_classes=3, steps=1)
    with pytest.raises(ConfigError, match=r"n_target_classes=3 .* allowed: 1\.\.2"):
        attack(model, x, torch.zeros(2, dtype=torch.long))


def test_registered_under_fab_and_fab_t():
    threat = ThreatModel("linf", 0.1)
    assert isinstance(ATTACKS.get("fab")(threat, seed=1), FAB)
    targeted = ATTACKS.get("fab-t")(threat, seed=1)
    assert isinstance(targeted, FABTargeted) and targeted.n_target_classes == 9


# -- parity with AutoAttack's FAB -------------------------------------------------------------

def _accuracy(model, x_adv, y):
    return float((model(x_adv).argmax(1) == y).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("targeted, norm, eps", [(True, "linf", 0.2), (False, "l2", 1.0)])
def test_robust_accuracy_within_one_point_of_autoattack_fab(robust_model, digits, targeted, norm, eps):
    # Prepare
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    x, y = digits.test.x, digits.test.y
    steps = 20
    reference = fab_pt.FABAttack_PT(robust_model, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1,
                                    n_iter=steps, eps=eps, targeted=targeted, n_target_classes=9, seed=0)
    cls = FABTargeted if targeted else FAB
    threat = ThreatModel(norm, eps)
    # Execute: the reference has no final search, so the like-for-like run switches it off
    theirs = _accuracy(robust_model, reference.perturb(x, y), y)
    ours_plain = cls(threat, steps=steps, search_steps=0)(robust_model, x, y)
    ours = cls(threat, steps=steps)(robust_model, x, y)
    # Assert
    acc_plain, acc = _accuracy(robust_model, ours_plain, y), _accuracy(robust_model, ours, y)
    assert 0.1 < theirs < 0.95, "the comparison needs a model that is neither broken nor untouched"
    assert abs(acc_plain - theirs) <= 0.01
    assert acc <= acc_plain, "the final search can only add fooled examples"
    assert bool(threat.contains(ours, x).all())


# -- half precision -----------------------------------------------------------------------------

def test_bfloat16_search_state_is_float32_and_records_the_points_the_model_judged(standard_model, digits,
                                                                                 monkeypatch):
    # Prepare: a bfloat16 model and batch; record the dtype of every iterate FAB steps from
    model = copy.deepcopy(standard_model).to(torch.bfloat16)
    x, y = digits.test.x[:20].to(torch.bfloat16), digits.test.y[:20]
    threat = ThreatModel("linf", 0.2)
    seen = []
    original = FAB._step

    def recording(self, current, x_nat, normal, offset):
        seen.append((current.dtype, x_nat.dtype))
        return original(self, current, x_nat, normal, offset)

    monkeypatch.setattr(FAB, "_step", recording)
    # Execute
    points, norms = FAB(threat, steps=10).minimal(model, x, y)
    # Assert: the search runs in float32; each returned point has x's dtype, fools the model and
    # lies at exactly the norm reported for it
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)
    found = torch.isfinite(norms)
    assert points.dtype == torch.bfloat16 and found.sum() >= 15
    with torch.no_grad():
        assert (model(points[found]).argmax(1) != y[found]).all()
    assert torch.equal(threat.distance(points, x)[found], norms[found])

