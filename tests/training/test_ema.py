"""Weight EMA: the decay's two ends, the average itself and its warm-up ramp, the exact swap for
evaluation, and the state a checkpoint keeps (the average and the update counter)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fortify.errors import CheckpointError, ConfigError
from fortify.training.ema import RAMP_OVER, UPDATES_KEY, ModelEMA


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


class _Scalar(nn.Module):
    """One scalar weight, set by hand, so that the average can be computed on paper."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value))

    def set(self, value: float) -> None:
        with torch.no_grad():
            self.w.fill_(value)


def _averages(ema: ModelEMA, model: _Scalar, values: list[float]) -> list[float]:
    """The average after each update, the weight set to each of ``values`` in turn."""
    averages = []
    for value in values:
        model.set(value)
        ema.update()
        averages.append(ema.shadow["w"].item())
    return averages


def test_decay_zero_follows_the_model_exactly():
    model = _model()
    ema = ModelEMA(model, decay=0.0)
    _train_steps(model, ema)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.shadow[key], value), key


def test_decay_one_without_warmup_keeps_the_initial_weights():
    model = _model()
    initial = _state(model)
    ema = ModelEMA(model, decay=1.0, warmup=False)
    _train_steps(model, ema)
    assert not torch.equal(model[0].weight, initial["0.weight"])
    for key, value in initial.items():
        if value.is_floating_point():
            assert torch.equal(ema.shadow[key], value), key
    assert int(ema.shadow["1.num_batches_tracked"]) == 3  # integer buffers are copied, not averaged


def test_without_warmup_the_shadow_is_the_exponential_average_of_the_iterates():
    # Prepare: record each iterate by hand
    model = _model()
    ema = ModelEMA(model, decay=0.6, warmup=False)
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


def test_the_decay_ramps_up_to_its_cap_as_computed_by_hand():
    # Prepare: weight 0 at construction, then 1, 2, ..., 10. While the ramp d_t = (1 + t) / (10 + t) is
    # below the cap 0.5 (t < 8), the average after k updates is 0.9 k: (k/(9+k)) 0.9 (k-1) + (9/(9+k)) k
    model = _Scalar(0.0)
    ema = ModelEMA(model, decay=0.5)
    # Execute
    averages = _averages(ema, model, [float(k) for k in range(1, 11)])
    # Assert: the 9th update has d_8 = 9/18 = 0.5 and still gives 8.1; the 10th is capped at 0.5
    expected = [0.9 * k for k in range(1, 10)] + [0.5 * 8.1 + 0.5 * 10]
    assert averages == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 10 and ema.current_decay() == 0.5


def test_the_initial_weights_fade_within_a_few_updates_whatever_the_decay():
    # Prepare: the weight jumps from its initial 0 to 1 and stays there
    model = _Scalar(0.0)
    ema = ModelEMA(model, decay=0.999)
    # Execute
    averages = _averages(ema, model, [1.0] * 10)
    # Assert: the initial weight's share after k updates is prod_t (1 + t) / (10 + t) = 1 / C(k + 9, 9)
    # (0.1 after one, 1e-5 after ten); without the ramp it would be 0.999^k (0.99 after ten)
    expected = [1 - 1 / math.comb(k + 9, 9) for k in range(1, 11)]
    assert averages == pytest.approx(expected, rel=1e-6)


def test_decay_one_with_warmup_is_the_ramp_alone():
    model = _Scalar(0.0)
    ema = ModelEMA(model, decay=1.0)
    assert _averages(ema, model, [1.0, 2.0]) == pytest.approx([0.9, 1.8], rel=1e-6)
    assert ema.current_decay() == 3 / 12


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
    assert int(ema.state_dict()[UPDATES_KEY]) == 3
    assert other.updates == 3 and other.current_decay() == ema.current_decay()
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


def test_a_resumed_average_equals_an_uninterrupted_one_bit_for_bit():
    # Prepare: six updates in one go; three, a save and a load into a fresh EMA, three more
    values = [3.0, -1.0, 0.25, 7.0, 2.0, 5.5]
    model_a = _Scalar(1.0)
    uninterrupted = ModelEMA(model_a, decay=0.9)
    model_b = _Scalar(1.0)
    first_half = ModelEMA(model_b, decay=0.9)
    # Execute
    _averages(uninterrupted, model_a, values)
    _averages(first_half, model_b, values[:3])
    resumed = ModelEMA(model_b, decay=0.9)
    resumed.load_state_dict(first_half.state_dict())
    _averages(resumed, model_b, values[3:])
    # Assert: the counter came back too, or the ramp would have restarted at d_0 = 0.1
    assert torch.equal(resumed.shadow["w"], uninterrupted.shadow["w"])
    assert resumed.updates == uninterrupted.updates == 6


@pytest.mark.parametrize("decay", [0.9, 1.0])
def test_an_average_saved_without_a_counter_goes_on_with_the_fixed_decay(decay):
    # Prepare: a state as saved before the ramp existed (the average alone)
    model = _Scalar(2.0)
    saved = {k: v for k, v in ModelEMA(model, decay=decay).state_dict().items() if k != UPDATES_KEY}
    ema = ModelEMA(model, decay=decay)
    ema.load_state_dict(saved)
    # Execute
    model.set(12.0)
    ema.update()
    # Assert: the unramped rule it was built with, decay 1 included
    assert ema.updates == RAMP_OVER + 1 and ema.current_decay() == decay
    assert ema.shadow["w"].item() == pytest.approx(decay * 2.0 + (1 - decay) * 12.0, rel=1e-6)


@pytest.mark.parametrize(("counter", "message"), [
    (torch.tensor(-1), "must be >= 0, got -1"),
    (torch.tensor(2.0), "must be one int64"),
    (torch.tensor([2]), "must be one int64"),
])
def test_a_bad_update_counter_is_refused(counter, message):
    ema = ModelEMA(_Scalar(), decay=0.9)
    with pytest.raises(CheckpointError, match=message):
        ema.load_state_dict({**ema.state_dict(), UPDATES_KEY: counter})
    assert ema.updates == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_average_of_a_low_precision_model_follows_its_weights(dtype):
    # Prepare: one weight drifting from 1 to 2 over 6,000 updates at decay 0.999, past the point
    # where (1 - decay) drops below bfloat16's resolution and a bf16 average stood still
    weight = nn.Parameter(torch.tensor(1.0, dtype=dtype))
    model = nn.Module()
    model.register_parameter("w", weight)
    ema = ModelEMA(model, decay=0.999, warmup=False)
    exact = 1.0
    # Execute
    for t in range(6000):
        with torch.no_grad():
            weight.fill_(1.0 + t / 6000)
        exact = 0.999 * exact + 0.001 * float(weight)
        ema.update()
    # Assert: the float32 average tracks the exact one; the model gets it back in its own dtype
    assert abs(float(ema.shadow["w"]) - exact) < 1e-3 and exact > 1.8
    ema.copy_to()
    assert weight.dtype == dtype and abs(float(weight) - exact) < 1e-2
