"""channels_last weights: converted for the duration, the same outputs, the layout given back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from fortify import pipeline
from fortify.config import RunConfig
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.models.layout import (
    channels_last,
    restore_layout,
    runs_channels_last,
    to_channels_last,
    to_contiguous,
)
from fortify.pipeline import analyse_model, evaluate_model, prepare

CL = torch.channels_last


def _is_cl(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _mixed_model() -> nn.Module:
    """4-D conv weights and BN buffers next to a 5-D Conv3d weight and 2-D linear weight."""
    torch.manual_seed(0)
    return nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3), "bn": nn.BatchNorm2d(8),
                          "conv3d": nn.Conv3d(1, 2, 3), "linear": nn.Linear(4, 2)})


def test_only_4d_tensors_convert_and_parameters_keep_their_identity():
    model = _mixed_model()
    model.bn.register_buffer("kernel", torch.randn(2, 3, 4, 5))  # a 4-D buffer converts too
    params_before = {name: p for name, p in model.named_parameters()}
    values_before = {name: t.clone() for name, t in model.state_dict().items()}
    saved = to_channels_last(model)  # Module.to(memory_format=channels_last) raises on the Conv3d
    assert _is_cl(model.conv.weight) and _is_cl(model.bn.kernel)
    assert model.conv3d.weight.is_contiguous() and model.linear.weight.is_contiguous()
    assert {name: p for name, p in model.named_parameters()} == params_before  # same objects
    restore_layout(saved)
    assert model.conv.weight.is_contiguous() and model.bn.kernel.is_contiguous()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, values_before[name]), name


def test_to_contiguous_keeps_the_values_trained_meanwhile_in_the_default_strides():
    model = _mixed_model()
    model.add_module("gray", nn.Conv2d(1, 4, 3))  # one input channel: passes is_contiguous either way
    params_before = {name: p for name, p in model.named_parameters()}
    to_channels_last(model)
    assert model.gray.weight.stride() == (9, 1, 3, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what training in channels_last changed
    trained = {name: t.clone() for name, t in model.state_dict().items()}
    to_contiguous(model)
    assert model.gray.weight.stride() == (9, 9, 3, 1) and model.conv.weight.stride() == (27, 9, 3, 1)
    assert {name: p for name, p in model.named_parameters()} == params_before  # same objects
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_the_network_runs_channels_last_inside_with_the_same_outputs():
    model = build_model("preact-resnet18", (3, 16, 16), 10).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    layouts: list[bool] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda _m, _i, out: layouts.append(_is_cl(out)))
    with channels_last(model, probe=x[:1]):
        inside = model(x)  # contiguous input: the converted weights carry the layout over
    hook.remove()
    assert layouts == [True, True]  # the probe pass and the call above
    torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_gradient_reaches_the_pool_before_flatten_channels_last_and_unchanged():
    torch.manual_seed(0)
    model = build_model("small-cnn", (3, 8, 8), 10).eval()
    flatten = next(m for m in model.modules() if isinstance(m, nn.Flatten))
    grad_layouts: list[bool] = []

    def watch_gradient(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        # registered after the layout's own hook, so this sees what the max-pool's backward gets
        inputs[0].register_hook(lambda g: grad_layouts.append(_is_cl(g)))

    def input_gradient() -> Tensor:
        handle = flatten.register_forward_pre_hook(watch_gradient)
        x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (grad,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
        handle.remove()
        return grad

    expected = input_gradient()
    with channels_last(model):
        inside = input_gradient()
    assert grad_layouts == [False, True]  # NCHW model: NCHW gradient; inside: converted at Flatten
    torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-6)
    assert not flatten._forward_pre_hooks  # the layout's hook leaves with it


def test_the_layout_comes_back_after_an_error():
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError), channels_last(model):
        assert _is_cl(model[0].weight)
        raise ValueError("boom")
    assert model[0].weight.is_contiguous()


class _Viewing(nn.Module):
    """Flattens with ``view``, which channels_last activations do not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        return self.head(h.view(h.shape[0], -1))


def test_a_model_that_cannot_run_channels_last_is_a_config_error_and_is_left_as_it_was():
    model = _Viewing().train()
    stats = model.bn.running_mean.clone()
    with (pytest.raises(ConfigError, match="does not run with channels_last weights.*without channels_last"),
          channels_last(model, probe=torch.rand(1, 2, 6, 6))):
        pass
    assert model.training and torch.equal(model.bn.running_mean, stats)  # probed in eval mode
    assert model.conv.weight.is_contiguous()


def _conv_layouts(model: nn.Module) -> tuple[list[bool], torch.utils.hooks.RemovableHandle]:
    """Per forward pass, whether the first convolution's output came out channels_last."""
    seen: list[bool] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return seen, first_conv.register_forward_hook(lambda _m, _i, out: seen.append(_is_cl(out)))


def test_eval_channels_last_reaches_the_attacks_and_changes_no_result(standard_model):
    def evaluated(layout: bool):
        config = RunConfig.model_validate({
            "eval": {"attacks": ["fgsm", "pgd"], "steps": 5, "n_examples": 60, "eps_grid": [0.1],
                     "channels_last": layout},
            "analysis": {"margin_examples": 8, "margin_steps": 10, "certify_examples": 4, "certify_n": 50,
                         "masking_examples": 16, "gallery_examples": 0, "privacy": False}})
        setup = prepare(config, "cpu")
        seen, hook = _conv_layouts(standard_model)
        report = evaluate_model(setup, standard_model)
        hook.remove()
        return setup, report, seen

    _, plain, seen_plain = evaluated(False)
    setup, fast, seen_fast = evaluated(True)
    assert seen_fast and all(seen_fast) and not any(seen_plain)
    assert (fast.channels_last, plain.channels_last) == (True, False)  # what the evaluation used
    assert all(p.is_contiguous() for p in standard_model.parameters())  # given back afterwards
    assert fast.clean_correct == plain.clean_correct
    for a, b in zip(fast.attacks, plain.attacks, strict=True):
        # float rounding differs between the layouts; a near-tie may fall the other way, no more
        assert sum(x != y for x, y in zip(a.robust, b.robust, strict=True)) <= 1, a.name
    seen, hook = _conv_layouts(standard_model)
    analyse_model(setup, standard_model, fast)
    hook.remove()
    assert seen and all(seen)


def test_runs_channels_last_asks_the_model_and_leaves_it_as_it_was():
    probe = torch.rand(1, 2, 6, 6)
    viewing = _Viewing().train()
    stats = viewing.bn.running_mean.clone()
    assert not runs_channels_last(viewing, probe)  # fails on channels_last activations
    assert viewing.training and torch.equal(viewing.bn.running_mean, stats)
    assert viewing.conv.weight.is_contiguous()
    cnn = build_model("small-cnn", (2, 8, 8), 3)
    assert runs_channels_last(cnn, torch.rand(1, 2, 8, 8))
    assert all(p.is_contiguous() for p in cnn.parameters())
    assert not runs_channels_last(build_model("mlp", (2, 8, 8), 3), torch.rand(1, 2, 8, 8))  # nothing 4-D


class _ViewsWhileTraining(nn.Module):
    """Batch norm and dropout, and a ``view`` on the path that training mode alone takes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.bn(self.conv(x)))
        return self.fc(h.view(len(h), -1) if self.training else h.reshape(len(h), -1))


def test_the_training_probe_takes_the_training_path_and_changes_nothing():
    # Prepare: statistics that a training-mode forward pass would move
    model = _ViewsWhileTraining().eval()
    model.bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.rand(2, 2, 6, 6) + 3.0
    # Execute
    torch.manual_seed(7)
    in_eval = runs_channels_last(model, probe)
    in_training = runs_channels_last(model, probe, training=True)
    after_probe = torch.rand(3)
    torch.manual_seed(7)
    untouched = torch.rand(3)
    # Assert: only the training probe finds the view; the statistics, the mode and the random
    # stream (dropout draws from it) are as they were
    assert in_eval and not in_training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and torch.equal(after_probe, untouched)


class _ViewingDigits(nn.Module):
    """A digits classifier that flattens with ``view``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).relu()
        return self.head(h.view(h.shape[0], -1))


class _BatchMergingDigits(_ViewingDigits):
    """A view that merges the batch axis with the channels: it passes on one channels_last example
    (the stride check ignores an axis of size 1) and fails on two."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).relu()
        n, c, height, width = h.shape
        return self.head(torch.softmax(h.view(n * c, height * width), dim=1).reshape(n, -1))


def _default_eval_setup():
    return prepare(RunConfig.model_validate({"eval": {"attacks": ["fgsm"], "n_examples": 20,
                                                      "eps_grid": [0.1]}}), "cpu")


def test_eval_channels_last_unset_is_on_for_a_cnn_on_cpu(standard_model):
    setup = _default_eval_setup()
    assert setup.config.eval.channels_last is None
    seen, hook = _conv_layouts(standard_model)
    report = evaluate_model(setup, standard_model)
    hook.remove()
    assert seen and all(seen)
    assert report.channels_last is True  # recorded as used, where the setting says null
    assert all(p.is_contiguous() for p in standard_model.parameters())


@pytest.mark.parametrize("model_class", [_ViewingDigits, _BatchMergingDigits])
def test_eval_channels_last_unset_falls_back_for_a_model_that_cannot_run_it(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    setup = _default_eval_setup()
    seen, hook = _conv_layouts(model)
    report = evaluate_model(setup, model)  # explicitly on, this is a ConfigError (test above)
    hook.remove()
    assert seen[0] and len(seen) > 1 and not any(seen[1:])  # the probe alone ran channels_last
    assert report.attacks[0].name == "fgsm" and report.channels_last is False


def test_eval_channels_last_unset_stays_off_on_a_gpu(standard_model, monkeypatch):
    setup = dataclasses.replace(_default_eval_setup(), device=torch.device("cuda"))
    monkeypatch.setattr(pipeline, "runs_channels_last", lambda *_: pytest.fail("probed on a GPU"))
    assert not pipeline.eval_channels_last(setup, standard_model, setup.dataset.test)


def test_eval_channels_last_asked_for_a_model_that_cannot_is_a_config_error_and_changes_nothing():
    model = _ViewingDigits().eval()
    setup = prepare(RunConfig.model_validate({"eval": {"attacks": ["fgsm"], "n_examples": 20,
                                                       "eps_grid": [0.1], "channels_last": True}}), "cpu")
    with pytest.raises(ConfigError, match="does not run with channels_last weights"):
        evaluate_model(setup, model)
    assert model.conv.weight.is_contiguous()


def test_eval_channels_last_asked_for_a_model_without_4d_weights_is_recorded_as_not_used():
    # an MLP has nothing to convert: `--channels-last` used to record true for a layout never used
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10).eval()
    setup = prepare(RunConfig.model_validate({"eval": {"attacks": ["fgsm"], "n_examples": 20,
                                                       "eps_grid": [0.1], "channels_last": True}}), "cpu")
    assert evaluate_model(setup, model).channels_last is False


def test_tied_weights_and_shared_buffers_stay_shared_and_get_their_layout_back():
    # a tensor held by two modules was recorded twice: the second record held the converted data, so
    # the weight stayed channels_last afterwards, and a shared buffer became two tensors for good
    first, second = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    second.weight = first.weight
    shared = torch.randn(1, 3, 5, 5)
    first.register_buffer("table", shared)
    second.register_buffer("table", shared)
    model = nn.Sequential(first, second)
    strides = first.weight.stride()
    with channels_last(model):
        assert first.weight.is_contiguous(memory_format=torch.channels_last)
        assert first.table is second.table
    assert first.weight.stride() == strides and first.table is shared and second.table is shared
    to_channels_last(model)
    to_contiguous(model)
    assert first.weight.stride() == strides and first.table is second.table
