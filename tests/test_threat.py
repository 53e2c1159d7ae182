"""ThreatModel: projection, random starts and membership hold for any shape, dtype, eps and norm."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fortify.attacks.base import Attack
from fortify.errors import ConfigError, DataError
from fortify.threat import ThreatModel

shapes = st.sampled_from([(1, 3), (4, 7), (2, 1, 5, 5), (3, 3, 4, 4), (5, 30)])
dtypes = st.sampled_from([torch.float32, torch.float64])
norms = st.sampled_from(["linf", "l2"])


def _threat(norm: str, eps_fraction: float, lo: float, width: float) -> ThreatModel:
    hi = lo + width
    # the box width as the threat model computes it: (lo + width) - lo may round above width
    return ThreatModel(norm, eps_fraction * (hi - lo), (lo, hi))


@settings(max_examples=150, deadline=None)
@given(shape=shapes, dtype=dtypes, norm=norms, eps_fraction=st.floats(1e-3, 1.0),
       lo=st.floats(-2, 2), width=st.floats(0.1, 4), spread=st.floats(0.0, 10.0),
       seed=st.integers(0, 2**16))
def test_project_lands_in_ball_and_box_and_is_idempotent(shape, dtype, norm, eps_fraction, lo, width,
                                                           spread, seed):
    # Prepare: a clean point in the box and an arbitrary far-away candidate
    threat = _threat(norm, eps_fraction, lo, width)
    gen = torch.Generator().manual_seed(seed)
    x = lo + width * torch.rand(shape, generator=gen, dtype=dtype)
    candidate = x + spread * torch.randn(shape, generator=gen, dtype=dtype)
    # Execute
    once = threat.project(candidate, x)
    twice = threat.project(once, x)
    # Assert
    assert once.dtype == dtype and once.shape == x.shape
    assert threat.contains(once, x).all()
    assert torch.allclose(once, twice, atol=1e-6 * (abs(lo) + width), rtol=0)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, norm=norms, eps_fraction=st.floats(1e-3, 1.0), seed=st.integers(0, 2**16))
def test_random_start_is_inside(shape, norm, eps_fraction, seed):
    threat = _threat(norm, eps_fraction, 0.0, 1.0)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    start = threat.random_start(x, torch.Generator().manual_seed(seed))
    assert threat.contains(start, x).all()


def test_project_is_the_identity_inside_the_set():
    threat = ThreatModel("l2", 0.5)
    x = torch.full((2, 4), 0.5)
    inside = x + 0.1
    assert torch.equal(threat.project(inside, x), inside)


def test_linf_projection_matches_the_per_coordinate_clip():
    threat = ThreatModel("linf", 0.1)
    x = torch.tensor([[0.05, 0.5, 0.95]])
    far = torch.tensor([[-1.0, 0.9, 2.0]])
    assert torch.allclose(threat.project(far, x), torch.tensor([[0.0, 0.6, 1.0]]))


def test_l2_projection_scales_onto_the_sphere():
    threat = ThreatModel("l2", 0.3)
    x = torch.full((1, 2), 0.5)
    far = x + torch.tensor([[0.3, 0.4]])  # distance 0.5 along (0.6, 0.8)
    assert torch.allclose(threat.project(far, x), x + torch.tensor([[0.18, 0.24]]))


def test_l2_projection_scales_then_clips_which_is_not_always_the_nearest_point():
    # Prepare: x near the box's face, a candidate whose scaled step crosses it
    threat = ThreatModel("l2", 0.5)
    x = torch.tensor([[0.9, 0.3]])
    far = torch.tensor([[1.5, 1.1]])  # x + (0.6, 0.8)
    # Execute
    projected = threat.project(far, x)
    # Assert: scaled to x + (0.3, 0.4), then clipped at 1; a point of ball and box lies nearer
    assert torch.allclose(projected, torch.tensor([[1.0, 0.7]]))
    nearer = torch.tensor([[1.0, 0.78]])
    assert threat.contains(nearer, x).all()
    assert float((nearer - far).norm()) < float((projected - far).norm())


def test_low_precision_projection_is_inside_within_its_tolerance():
    threat = ThreatModel("l2", 0.5)
    x = torch.rand(8, 3, 8, 8).to(torch.bfloat16)
    far = x + torch.randn(8, 3, 8, 8).to(torch.bfloat16)
    assert threat.contains(threat.project(far, x), x).all()


def test_contains_rejects_points_outside_ball_box_or_nonfinite():
    threat = ThreatModel("linf", 0.1)
    x = torch.full((4, 3), 0.5)
    bad = x.clone()
    bad[0, 0] += 0.2  # outside the ball
    bad[1, 1] = 1.05  # outside the box (and the ball)
    bad[2, 2] = float("nan")
    assert threat.contains(bad, x).tolist() == [False, False, False, True]


def test_ascent_direction_has_unit_norm():
    grad = torch.randn(5, 3, 4, 4)
    l2 = ThreatModel("l2", 1.0).ascent_direction(grad)
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.ones(5))
    linf = ThreatModel("linf", 0.1).ascent_direction(grad)
    assert torch.equal(linf.abs(), torch.ones_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ascent_direction_has_unit_norm_for_gradients_far_below_the_norms_clamp(dtype):
    # a saturated softmax's input gradient: norm 1e-20 was clamped to 1e-12 (and in float32 the squares
    # of 1e-22 underflow), so the "unit" step had length 1e-8 or less
    scales = torch.tensor([1.0, 1e-15, 1e-20, 1e-22], dtype=dtype).reshape(4, 1, 1, 1)
    grad = torch.randn(4, 3, 4, 4, dtype=dtype) * scales
    grad[3, 0] = 0.0  # zeros beside tiny values
    l2 = ThreatModel("l2", 1.0).ascent_direction(grad)
    torch.testing.assert_close(l2.flatten(1).norm(dim=1), torch.ones(4, dtype=dtype))
    unit = grad.double().flatten(1) / grad.double().flatten(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close(l2.double().flatten(1), unit, rtol=1e-5, atol=1e-6)
    zero = ThreatModel("l2", 1.0).ascent_direction(torch.zeros(2, 3, dtype=dtype))
    # infinite entries alone set the direction (inf / inf was NaN); a NaN entry counts as 0
    odd = torch.tensor([[torch.inf, 1.0, -torch.inf], [torch.nan, 3.0, -4.0]], dtype=dtype)
    expected = torch.tensor([[2**-0.5, 0.0, -(2**-0.5)], [0.0, 0.6, -0.8]], dtype=dtype)
    torch.testing.assert_close(ThreatModel("l2", 1.0).ascent_direction(odd), expected)
    assert torch.equal(ThreatModel("linf", 0.1).ascent_direction(odd),
                       torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, -1.0]], dtype=dtype))
    assert torch.equal(zero, torch.zeros(2, 3, dtype=dtype))  # no gradient, no step (not 0/0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"eps": -0.1}, "eps must be a finite number > 0"),
    ({"eps": math.nan}, "eps must be a finite number > 0"),
    ({"eps": 1.5}, "beyond the box"),
    ({"norm": "l7"}, "valid norms: linf, l2"),
    ({"bounds": (1.0, 0.0)}, "low < high"),
    ({"eps": True}, "eps must be a finite number > 0, got True"),
    ({"eps": "0.1"}, "eps must be a finite number > 0, got '0.1'"),
    ({"eps": None}, "eps must be a finite number > 0, got None"),
    ({"eps": torch.tensor([0.1, 0.2])}, "eps must be a finite number > 0"),
    ({"bounds": "01"}, "bounds must be two finite numbers"),
    ({"bounds": (0.0,)}, "bounds must be two finite numbers"),
    ({"bounds": None}, "bounds must be two finite numbers"),
])
def test_bad_settings_are_rejected_with_the_value(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ThreatModel(**{"norm": "linf", "eps": 0.1, **kwargs})


def test_numpy_and_tensor_numbers_are_taken_as_floats():
    import numpy as np

    threat = ThreatModel("l2", np.float64(0.5), bounds=np.array([0, 255]))
    assert threat == ThreatModel("l2", 0.5, bounds=(0.0, 255.0))
    assert type(threat.eps) is float and ThreatModel("linf", torch.tensor(0.25)).eps == 0.25


def test_l2_eps_beyond_the_box_diameter_is_rejected():
    with pytest.raises(ConfigError, match="diameter"):
        ThreatModel("l2", 3.0).check_inputs(torch.rand(2, 4))  # diameter of [0,1]^4 is 2


@pytest.mark.parametrize("x, fragment", [
    (torch.tensor([[0.5, 1.5]]), "outside the declared box"),
    (torch.tensor([[0.5, float("nan")]]), "NaN/Inf"),
    (torch.tensor([0.5, 0.5]), "shape \\(N, ...\\)"),
    (torch.tensor([[1, 0]]), "floating point"),
])
def test_bad_inputs_are_rejected(x, fragment):
    with pytest.raises(DataError, match=fragment):
        ThreatModel("linf", 0.1).check_inputs(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value, fragment", [
    (float("inf"), "1 NaN/Inf"), (-float("inf"), "1 NaN/Inf"), (float("nan"), "1 NaN/Inf"),
    (-0.01, "outside the declared box"), (1.01, "outside the declared box"),
])
def test_one_bad_value_anywhere_in_a_batch_is_found(dtype, value, fragment):
    # the check first reads only the batch's extremes: a single NaN, infinity or stray value among
    # thousands of good ones must still be named, in every float dtype and memory layout
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[11, 2, 5, 3] = value
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        with pytest.raises(DataError, match=fragment):
            ThreatModel("linf", 0.1).check_inputs(layout)


def test_a_nan_among_values_outside_the_box_is_named_as_a_nan():
    x = torch.full((4, 3), 2.0)
    x[1, 1] = float("nan")
    with pytest.raises(DataError, match="1 NaN/Inf"):
        ThreatModel("linf", 0.1).check_inputs(x)


def test_the_box_edges_and_other_boxes_pass_and_an_empty_example_is_refused():
    ThreatModel("linf", 0.1).check_inputs(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    ThreatModel("linf", 1.0, bounds=(-2.0, 255.0)).check_inputs(torch.tensor([[-2.0, 255.0]]))
    with pytest.raises(DataError, match="non-empty batch"):
        ThreatModel("linf", 0.1).check_inputs(torch.zeros(3, 0))


def test_random_start_names_integer_inputs():
    with pytest.raises(DataError, match="floating point, got dtype torch.uint8"):
        ThreatModel("linf", 0.1).random_start(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 0.5)])
def test_projection_in_half_precision_lands_inside_the_exact_ball_and_box(dtype, norm, eps):
    # rounding to nearest pushed coordinates out by half a unit in the last place (0.4% in bfloat16)
    generator = torch.Generator().manual_seed(0)
    threat = ThreatModel(norm, eps)
    x = torch.rand(64, 3, 32, 32, generator=generator).to(dtype)
    projected = threat.project(x.float() + torch.randn(x.shape, generator=generator), x)
    assert projected.dtype == dtype
    assert bool((threat.distance(projected, x) <= eps).all())  # no tolerance
    assert bool(((projected >= 0) & (projected <= 1)).all())
    # and little of the budget is lost to the rounding
    assert float(threat.distance(projected, x).median()) > 0.97 * eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 0.5)])
def test_contains_in_half_precision_rejects_a_point_one_percent_outside(dtype, norm, eps):
    # the slack was half precision's unit times sqrt(d) for L2: in bfloat16 on 3x32x32 inputs that
    # accepted points at distance eps + 2.6, five times the ball's radius
    threat = ThreatModel(norm, eps)
    x = torch.zeros(2, 3, 32, 32, dtype=dtype)  # near 0 the grid is fine enough to step 1% outside
    direction = torch.ones_like(x, dtype=torch.float32)
    if norm == "l2":
        direction /= direction[0].norm()
    outside = (x.float() + 1.01 * eps * direction).to(dtype)
    assert bool((threat.distance(outside, x) > eps).all())
    assert not threat.contains(outside, x).any()
    assert threat.contains(threat.project(outside, x), x).all()


class _NearestCast(Attack):
    """Answers a point on the ball's surface computed in float32 and cast to nearest, as the
    minimal-norm attacks (which search in float32) did."""

    def perturb(self, model, x, y, target, generator):
        direction = torch.randn(x.shape, generator=generator)
        direction /= direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        return (x.float() + self.threat.eps * direction).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_attack_answer_in_half_precision_is_inside_the_exact_ball(dtype):
    threat = ThreatModel("l2", 0.5)
    x = torch.full((64, 3, 8, 8), 0.5, dtype=dtype)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).to(dtype)
    cast = _NearestCast(threat)(model, x, torch.zeros(64, dtype=torch.long))
    assert bool((threat.distance(cast, x) <= threat.eps).all())
