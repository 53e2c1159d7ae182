"""Weight EMA: the decay's two ends, the average itself, and the exact swap for evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.errors import CheckpointError, ConfigError
from fortify.training.ema import ModelEMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train_steps(model: nn.Module, ema: ModelEMA, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 4, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_decay_zero_follows_the_model_exactly():
    model = _model()
    ema = ModelEMA(model, decay=0.0)
    _train_steps(model, ema)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.shadow[key], value), key


def test_decay_one_keeps_the_initial_weights():
    model = _model()
    initial = _state(model)
    ema = ModelEMA(model, decay=1.0)
    _train_steps(model, ema)
    assert not torch.equal(model[0].weight, initial["0.weight"])
    for key, value in initial.items():
        if value.is_floating_point():
            assert torch.equal(ema.shadow[key], value), key
    assert int(ema.shadow["1.num_batches_tracked"]) == 3  # integer buffers are copied, not averaged


def test_the_shadow_is_the_exponential_average_of_the_iterates():
    # Prepare: record each iterate by hand
    model = _model()
    ema = ModelEMA(model, decay=0.6)
    expected = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # Execute
    for step in range(3):
        loss = model(torch.rand(16, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        expected = 0.6 * expected + 0.4 * model[0].weight.detach()
    # Assert
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-7)


def test_applied_swaps_the_average_in_and_restores_the_trained_weights_exactly():
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    _train_steps(model, ema)
    trained = _state(model)
    with ema.applied() as averaged:
        assert averaged is model
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])
        assert not torch.equal(model[0].weight, trained["0.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_state_round_trip_and_bad_inputs():
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    _train_steps(model, ema)
    other = ModelEMA(_model(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(CheckpointError, match="EMA state lacks"):
        other.load_state_dict({})
    with pytest.raises(ConfigError, match=r"EMA decay must be in \[0, 1\], got 1.5"):
        ModelEMA(model, decay=1.5)


@pytest.mark.parametrize("damage", [
    lambda state: {**state, "ema.3.bias": torch.zeros(1)},  # would broadcast into the bias of 2
    lambda state: {**state, "ema.0.weight": torch.zeros(4)},  # would broadcast into every row
    lambda state: {**state, "ema.9.weight": torch.zeros(2)},  # a layer this model lacks
])
def test_an_average_of_another_model_is_refused(damage):
    ema = ModelEMA(_model(), decay=0.5)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with pytest.raises(CheckpointError, match="EMA state does not fit this model"):
        ema.load_state_dict(damage(ema.state_dict()))
    assert all(torch.equal(ema.shadow[k], v) for k, v in before.items())  # nothing half-loaded
