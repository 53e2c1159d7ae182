"""The input card: closed-form input conversion, layout resolution, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fortify.errors import ConfigError, DataError
from fortify.interop.card import InputAdapter, InputCard, check_on_sample, parse_numbers, resolve_layout


class _Recorder(nn.Module):
    """Returns a fixed logit row and keeps what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.reshape(len(x), -1)[:, :3]


def test_adapter_maps_box_range_normalisation_and_layout_in_closed_form():
    # Prepare: data in the box [-1, 1]; a model trained on [0, 255], standardised, channels last
    card = InputCard(layout="nhwc", input_range=(0, 255), mean=(100.0, 50.0), std=(2.0, 4.0))
    recorder = _Recorder()
    adapter = InputAdapter(recorder, card, bounds=(-1.0, 1.0))
    x = torch.rand(5, 2, 3, 4) * 2 - 1
    # Execute
    adapter(x)
    # Assert: pixel = (x + 1) * 127.5, then (pixel - mean) / std per channel, then N, H, W, C
    pixels = (x + 1) * 127.5
    expected = torch.stack([(pixels[:, 0] - 100) / 2, (pixels[:, 1] - 50) / 4], dim=-1)
    torch.testing.assert_close(recorder.seen, expected)


def test_default_card_passes_inputs_unchanged_and_gradients_through():
    adapter = InputAdapter(_Recorder(), InputCard(), bounds=(0.0, 1.0))
    x = torch.rand(2, 3, 2, 2, requires_grad=True)
    adapter(x).sum().backward()
    assert torch.equal(adapter.model.seen, x)
    assert x.grad.reshape(2, -1)[:, :3].eq(1).all() and x.grad.reshape(2, -1)[:, 3:].eq(0).all()


@pytest.mark.parametrize("requested, declared, data, expected", [
    ("auto", (8, 8, 1), (1, 8, 8), "nhwc"),
    ("auto", (1, 8, 8), (1, 8, 8), "nchw"),
    ("auto", (None, None, 3), (3, 32, 32), "nhwc"),
    ("auto", None, (3, 32, 32), "nchw"),
    ("nhwc", (32, 32, 3), (3, 32, 32), "nhwc"),
    ("auto", (30,), (30,), "nchw"),
])
def test_layout_resolution(requested, declared, data, expected):
    assert resolve_layout(requested, declared, data) == expected


@pytest.mark.parametrize("requested, declared, data, error, fragment", [
    ("auto", (None, None, None), (3, 32, 32), ConfigError, "pass --layout nchw or --layout nhwc"),
    ("auto", (28, 28, 1), (1, 8, 8), DataError, "neither channels first nor channels last"),
    ("nchw", (8, 8, 1), (1, 8, 8), DataError, "in layout nchw have shape (1, 8, 8)"),
    ("chw", None, (1, 8, 8), ConfigError, "valid layouts: auto, nchw, nhwc"),
    ("nhwc", None, (30,), ConfigError, "the dataset's inputs are feature vectors of shape (30,)"),
    ("auto", (20,), (30,), DataError, "shape (20,) but the dataset's inputs have shape (30,)"),
])
def test_layout_errors(requested, declared, data, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(requested, declared, data)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"input_range": (1, 0)}, "low < high"),
    ({"input_range": (0, float("inf"))}, "finite"),
    ({"mean": (0.5,)}, "give --mean and --std together"),
    ({"mean": (0.5, 0.5), "std": (1.0,)}, "2 means and 1 stds"),
    ({"mean": (0.5,), "std": (0.0,)}, "std must be a finite number > 0"),
    ({"mean": (float("nan"),), "std": (1.0,)}, "every mean must be a finite number"),
    ({"mean": (float("inf"),), "std": (1.0,)}, "every mean must be a finite number"),
    ({"layout": "hwc"}, "valid layouts: nchw, nhwc"),
])
def test_bad_cards(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        InputCard(**kwargs)


def test_parse_numbers():
    assert parse_numbers("0, 255", "--input-range", 2) == (0.0, 255.0)
    assert parse_numbers(None, "--mean") is None
    with pytest.raises(ConfigError, match="--mean takes comma-separated numbers"):
        parse_numbers("0.5,x", "--mean")
    with pytest.raises(ConfigError, match="--input-range takes 2 numbers, got '1,2,3'"):
        parse_numbers("1,2,3", "--input-range", 2)


def test_sample_check_refuses_wrong_output_and_warns_at_chance():
    x, y = torch.rand(40, 1, 2, 2), torch.arange(40) % 4
    adapter = InputAdapter(_Recorder(), InputCard(), bounds=(0.0, 1.0))
    with pytest.raises(DataError, match=r"outputs of shape \(40, 3\).*expected \(40, 5\)"):
        check_on_sample(adapter, x, y, num_classes=5)
    constant = InputAdapter(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), InputCard(), bounds=(0.0, 1.0))
    nn.init.zeros_(constant.model[1].weight)
    with torch.no_grad():
        constant.model[1].bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # always class 0: 25% correct
    warnings = check_on_sample(constant, x, y, num_classes=4)
    assert len(warnings) == 1 and "25.0%" in warnings[0] and "close to chance" in warnings[0]
    with torch.no_grad():
        constant.model[1].bias.fill_(float("nan"))
    with pytest.raises(DataError, match="NaN"):
        check_on_sample(constant, x, y, num_classes=4)
    labels = InputAdapter(_ClassIndices(), InputCard(), bounds=(0.0, 1.0))
    with pytest.raises(DataError, match="returns torch.int64 outputs; fortify needs floating-point logits"):
        check_on_sample(labels, x, y, num_classes=4)


class _ClassIndices(nn.Module):
    """Outputs one-hot class indices as integers, as a model exported with an argmax might."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x.flatten(1).sum(1).long() % 4, 4)
