"""Linear layers on oneDNN: torch's values and gradients, only the products asked for, the class
given back, and the setting that turns it on or off."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from fortify.config import DPConfig, RunConfig, TrainConfig
from fortify.data import Split
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.models import onednn_linear as module
from fortify.models.modes import runs_alike_in_both_modes
from fortify.models.onednn_linear import (
    MIN_MULTIPLY_ADDS,
    SETTING_VARIABLE,
    OneDNNLinear,
    onednn_linear,
    onednn_linear_pays,
)
from fortify.pipeline import analyse_model, evaluate_model, prepare
from fortify.threat import ThreatModel
from fortify.training.dp import DPTrainer
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

THREAT = ThreatModel("linf", 0.2)

pytestmark = pytest.mark.skipif(not module._kernel_available(),
                                reason="this torch build has no oneDNN linear kernel")


@pytest.fixture
def products(monkeypatch):
    """The number of oneDNN products run so far."""
    calls = []
    real = module._product

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(module, "_product", counted)
    return calls


def _pair(in_features: int, out_features: int, bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer, copy.deepcopy(layer)


@pytest.mark.parametrize("shape, out_features, bias", [
    ((64, 1024), 128, True), ((4, 40, 512), 128, True), ((300, 256), 128, False)])
@pytest.mark.parametrize("loss_of", [lambda y: y.sum(), lambda y: (y ** 2).mean() + y.sum()],
                         ids=["sum", "squares"])
def test_outputs_and_gradients_are_torchs_to_float_rounding(products, shape, out_features, bias, loss_of):
    # Prepare: the same layer twice and the same input; sum() hands back a broadcast (stride-0) gradient
    ours, theirs = _pair(shape[-1], out_features, bias)
    x = torch.randn(*shape, requires_grad=True)
    # Execute
    with onednn_linear(ours):
        y = ours(x)
        our_grads = torch.autograd.grad(loss_of(y), [x, *ours.parameters()])
    y_ref = theirs(x)
    their_grads = torch.autograd.grad(loss_of(y_ref), [x, *theirs.parameters()])
    # Assert: oneDNN ran the output, the input's and the weight's products; the values are torch's
    assert len(products) == 3
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_the_input_gradient_alone_runs_no_weight_product(products):
    # Prepare: trainable weights, as in adversarial training, where the attack asks for the input's gradient
    layer, _ = _pair(1024, 128)
    x = torch.randn(64, 1024, requires_grad=True)
    with onednn_linear(layer):
        # Execute: the attack's gradient, then the training step's
        torch.autograd.grad(layer(x).sum(), x)
        attack_products = len(products)
        layer(x).sum().backward()
    # Assert: the output and the input's gradient, then also the weight's; the bias summed, not multiplied
    assert attack_products == 2
    assert len(products) == 5
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_frozen_parameters_get_no_gradient_and_no_product(products):
    layer, reference = _pair(1024, 128)
    for parameter in (*layer.parameters(), *reference.parameters()):
        parameter.requires_grad_(False)
    x = torch.randn(64, 1024, requires_grad=True)
    with onednn_linear(layer):
        (grad,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert len(products) == 2
    (expected,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_without_grad_mode_the_output_has_no_graph(products):
    layer, reference = _pair(1024, 128)
    x = torch.randn(64, 1024)
    with onednn_linear(layer), torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None and len(products) == 1
    torch.testing.assert_close(y, reference(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["small product", "float64", "bf16 autocast"])
def test_other_calls_are_torchs_own(products, case):
    # Prepare: a product just under the threshold, or one at 64x1024x128 in another precision
    rows = MIN_MULTIPLY_ADDS // (128 * 16) - 1 if case == "small product" else 64
    layer, reference = _pair(128 if case == "small product" else 1024, 16 if case == "small product" else 128)
    x = torch.randn(rows, layer.in_features)
    if case == "float64":
        layer, reference, x = layer.double(), reference.double(), x.double()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16 autocast")
    # Execute
    with onednn_linear(layer), autocast:
        y = layer(x)
        y_ref = reference(x)
    # Assert: no oneDNN product of ours, and exactly torch's value
    assert products == []
    assert torch.equal(y, y_ref)


def test_a_product_at_the_threshold_takes_onednn(products):
    layer, _ = _pair(128, 16)
    with onednn_linear(layer), torch.no_grad():
        layer(torch.randn(MIN_MULTIPLY_ADDS // (128 * 16), 128))
    assert len(products) == 1


def test_a_second_order_gradient_is_refused_with_the_switch_named():
    layer, _ = _pair(1024, 128)
    x = torch.randn(64, 1024, requires_grad=True)
    with onednn_linear(layer):
        y = layer(x)
        with pytest.raises(RuntimeError, match=f"{SETTING_VARIABLE}=0"):
            torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_only_exact_linear_layers_swap_and_their_class_comes_back():
    # Prepare: a linear layer, a subclass of it (whose forward may differ) and a conv
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Scaled(8, 8), nn.Linear(8, 2))
    keys = list(model.state_dict())
    # Execute: an error inside the context
    with pytest.raises(KeyError), onednn_linear(model):
        during = [type(m) for m in model]
        alike = runs_alike_in_both_modes(nn.Sequential(model[0], model[1], model[3]))
        raise KeyError("inside")
    # Assert: the plain layers swapped, still mode-independent, and all given back
    assert during == [OneDNNLinear, nn.ReLU, Scaled, OneDNNLinear]
    assert alike
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, Scaled, nn.Linear]
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("value, vendor, capability, expected", [
    ("0", "AuthenticAMD", "AVX512", False),
    ("1", "GenuineIntel", "AVX2", True),
    ("", "AuthenticAMD", "AVX512", True),
    ("", "AuthenticAMD", "AVX2", False),
    ("", "GenuineIntel", "AVX512", False),
    ("", None, "AVX512", False),
])
def test_the_setting_and_the_cpu_decide(monkeypatch, value, vendor, capability, expected):
    monkeypatch.setenv(SETTING_VARIABLE, value)
    monkeypatch.setattr(module, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert onednn_linear_pays(torch.device("cpu")) is expected
    assert onednn_linear_pays(torch.device("cuda")) is False


def test_a_setting_other_than_0_or_1_is_refused(monkeypatch):
    monkeypatch.setenv(SETTING_VARIABLE, "on")
    with pytest.raises(ConfigError, match=r"must be 1 .* 0 .* or unset.*'on'"):
        onednn_linear_pays(torch.device("cpu"))


def test_the_command_line_refuses_a_misspelt_setting_at_start_in_one_line(monkeypatch, capsys):
    from fortify import cli

    monkeypatch.setenv(SETTING_VARIABLE, "off")
    monkeypatch.setattr(sys, "argv", ["fortify", "--help"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"{SETTING_VARIABLE} must be 1" in err and "Traceback" not in err


# -- where fortify turns it on -----------------------------------------------------------------


def _classes_called(model: nn.Module) -> tuple[list[type], torch.utils.hooks.RemovableHandle]:
    """The class of the model's first linear layer at each of its forward passes on more than two
    examples (the checks before the work, whether the model runs channels_last or trains on one
    example, pass one or two)."""
    seen: list[type] = []
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if len(inputs[0]) > 2:
            seen.append(type(layer))
    return seen, first.register_forward_hook(record)


def _trained(digits, monkeypatch, setting: str) -> tuple[nn.Module, list[type]]:
    monkeypatch.setenv(SETTING_VARIABLE, setting)
    torch.manual_seed(0)
    model = build_model("small-cnn", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="pgd", epochs=1, batch_size=32, attack_steps=3, val_attack_steps=3,
                         lr=0.05, seed=5, early_stopping=False)
    objective = build_objective("pgd", ObjectiveOptions(THREAT, attack_steps=3, seed=5))
    seen, hook = _classes_called(model)
    Trainer(model, objective, config, threat=THREAT, show_progress=False).fit(
        Split(digits.train.x[:128], digits.train.y[:128]), Split(digits.val.x[:32], digits.val.y[:32]))
    hook.remove()
    return model, seen


def test_training_runs_its_linear_layers_as_the_setting_says_to_the_same_weights(digits, monkeypatch):
    # Execute: the same PGD training (4 steps, batch 32: 32x1024x128 products) with and without
    ours, seen_ours = _trained(digits, monkeypatch, "1")
    torchs, seen_torchs = _trained(digits, monkeypatch, "0")
    # Assert: every pass (attack, training step, validation) on oneDNN, or none; the class given back;
    # the weights those of torch's products to float rounding
    assert seen_ours and set(seen_ours) == {OneDNNLinear}
    assert seen_torchs and set(seen_torchs) == {nn.Linear}
    assert {type(m) for m in ours.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    for mine, reference in zip(ours.parameters(), torchs.parameters(), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_dp_training_keeps_torchs_linear_layers(digits, monkeypatch):
    # Opacus' per-example gradients are for the layer types it knows, matched exactly
    monkeypatch.setenv(SETTING_VARIABLE, "1")
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(objective="standard", epochs=1, batch_size=64, lr=0.5, momentum=0.0,
                         early_stopping=False)
    trainer = DPTrainer(model, build_objective("standard", ObjectiveOptions(THREAT)), config,
                        dp=DPConfig(enabled=True, noise_multiplier=1.0), threat=THREAT, show_progress=False)
    seen, hook = _classes_called(trainer.model)
    trainer.fit(Split(digits.train.x[:128], digits.train.y[:128]),
                Split(digits.val.x[:32], digits.val.y[:32]))
    hook.remove()
    assert seen and set(seen) == {nn.Linear}


def test_evaluation_runs_its_linear_layers_as_the_setting_says_to_the_same_results(standard_model,
                                                                                   monkeypatch):
    def evaluated(setting: str):
        monkeypatch.setenv(SETTING_VARIABLE, setting)
        config = RunConfig.model_validate({
            "eval": {"attacks": ["fgsm", "pgd"], "steps": 5, "n_examples": 60, "eps_grid": [0.1]},
            "analysis": {"margin_examples": 8, "margin_steps": 10, "certify_examples": 4, "certify_n": 50,
                         "masking_examples": 16, "gallery_examples": 0, "privacy": False}})
        setup = prepare(config, "cpu")
        seen, hook = _classes_called(standard_model)
        report = evaluate_model(setup, standard_model)
        analyse_model(setup, standard_model, report)
        hook.remove()
        return report, seen

    ours, seen_ours = evaluated("1")
    torchs, seen_torchs = evaluated("0")
    assert seen_ours and set(seen_ours) == {OneDNNLinear}
    assert seen_torchs and set(seen_torchs) == {nn.Linear}
    assert {type(m) for m in standard_model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert ours.clean_correct == torchs.clean_correct
    for a, b in zip(ours.attacks, torchs.attacks, strict=True):
        # float rounding differs between the kernels; a near-tie may fall the other way, no more
        assert sum(x != y for x, y in zip(a.robust, b.robust, strict=True)) <= 1, a.name
