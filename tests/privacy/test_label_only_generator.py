"""The random directions of the label-only distance depend on the seed alone, not on device or dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fortify.privacy.label_only import _random_directions, random_direction_distance


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


def _inputs(n: int = 24) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_directions_are_a_cpu_generators_draws_for_the_seed_cast_to_the_dtype(dtype: torch.dtype) -> None:
    # Prepare: what a CPU generator seeded with the seed draws, one tensor after the other
    shape, seed = torch.Size((3, 1, 4, 4)), 5
    reference = torch.Generator().manual_seed(seed)
    expected = [torch.randn(shape, generator=reference).to(dtype) for _ in range(3)]
    # Execute
    drawn = list(_random_directions(3, shape, seed=seed, device=torch.device("cpu"), dtype=dtype))
    # Assert: the same numbers, rounded to the dtype only
    assert len(drawn) == 3
    for got, want in zip(drawn, expected, strict=True):
        assert got.dtype == dtype and torch.equal(got, want)


def test_directions_are_not_drawn_on_the_target_device() -> None:
    # the meta device has no generator of its own (torch.Generator(device="meta") raises), so only
    # draws made elsewhere and moved there can reach it, as they must reach a GPU
    drawn = list(_random_directions(2, torch.Size((2, 3)), seed=0, device=torch.device("meta"),
                                    dtype=torch.float64))
    assert [(d.device.type, d.dtype, tuple(d.shape)) for d in drawn] == [("meta", torch.float64, (2, 3))] * 2


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_distances_of_a_float64_model_equal_those_of_its_float32_twin(norm: str) -> None:
    # Prepare: a model and its float64 copy; labels the model predicts, so no distance is 0
    model = _linear_model().eval()
    twin = copy.deepcopy(model).double()
    x = _inputs()
    y = model(x).argmax(1)
    settings = {"norm": norm, "directions": 4, "bisection_steps": 12, "seed": 3}
    # Execute
    single = random_direction_distance(model, x, y, **settings)
    double = random_direction_distance(twin, x, y, **settings)
    # Assert: the same directions, so the same distances to the bisection's resolution (radius / 2^12)
    radius = {"linf": 0.5, "l2": 1.0}[norm]  # the default max distance in [0, 1]: 1/2, sqrt(16) / 4
    assert (single > 0).all() and (single < radius).any()
    torch.testing.assert_close(double.float(), single, rtol=0, atol=2 * radius / 2**12)
