"""Every registered model: output shape, gradients to the input, sizes of the big nets."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fortify.errors import ConfigError, UnknownNameError
from fortify.models import MODELS, Normalize, build_model
from fortify.models.resnet import PreActResNet
from fortify.models.wideresnet import WideResNet

# name -> an input shape the model is meant for
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "small-cnn": (1, 28, 28),
    "mlp": (30,),
    "linear": (1, 8, 8),
    "preact-resnet18": (3, 32, 32),
    "wrn-28-10": (3, 32, 32),
    "wrn-34-10": (3, 32, 32),
}
EXPECTED_NAMES = set(INPUT_SHAPES)

# published parameter counts for 10 classes (Wong et al. 2020 / RobustBench)
PUBLISHED_PARAMS = {
    "preact-resnet18": 11.17e6,
    "wrn-28-10": 36.5e6,
    "wrn-34-10": 46.2e6,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_forward_backward(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape, num_classes)
    x = torch.rand(2, *input_shape, requires_grad=True)
    y = torch.tensor([0, num_classes - 1])
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, y).backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_registry_holds_the_expected_models() -> None:
    assert set(MODELS.names()) >= EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))  # WRNs: ~1 s each on 2 CPU threads
def test_forward_shape_and_input_gradient(name: str) -> None:
    _check_forward_backward(name, INPUT_SHAPES[name], num_classes=10)


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes"),
    [
        ("small-cnn", (1, 8, 8), 10),
        ("small-cnn", (3, 32, 32), 7),
        ("mlp", (1, 28, 28), 3),
        ("linear", (30,), 2),
        ("preact-resnet18", (1, 28, 28), 10),  # MNIST-sized: adaptive pooling
        ("preact-resnet18", (3, 64, 48), 100),
        ("preact-resnet18", (3, 8, 8), 5),
    ],
)
def test_other_input_shapes_and_class_counts(name: str, input_shape: tuple[int, ...],
                                             num_classes: int) -> None:
    _check_forward_backward(name, input_shape, num_classes)


def test_small_wideresnet_on_other_sizes() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2, num_classes=4, in_channels=1, dropout=0.3)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name: str) -> None:
    count = _count(build_model(name, (3, 32, 32), 10))
    published = PUBLISHED_PARAMS[name]
    assert abs(count - published) / published < 0.01, f"{name}: {count} parameters"


def _relu_then_pool(model: nn.Sequential) -> nn.Sequential:
    """``model`` with each pooling and the ReLU after it in the textbook order, ReLU first; the same
    layer objects, so the weights are shared."""
    layers = list(model)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 28, 28)])
def test_small_cnn_pooling_before_relu_computes_exactly_relu_then_pooling(input_shape) -> None:
    # Prepare: random weights and inputs, so that many pooling windows hold only negative values, and
    # an input with tied and zero activations (a constant image)
    torch.manual_seed(0)
    model = build_model("small-cnn", input_shape, 10)
    reference = _relu_then_pool(model)
    pools_before_relu = [i for i, layer in enumerate(model) if isinstance(layer, nn.MaxPool2d)]
    x = torch.cat([torch.randn(15, *input_shape), torch.zeros(1, *input_shape)])
    y = torch.arange(16) % 10
    # Execute: outputs, input gradients and parameter gradients of both orders
    results = []
    for net in (model, reference):
        net.zero_grad(set_to_none=True)
        point = x.clone().requires_grad_(True)
        logits = net(point)
        nn.functional.cross_entropy(logits, y).backward()
        results.append((logits, point.grad, [p.grad for p in net.parameters()]))
    # Assert: this order is the one built, and it changes no bit; the parameters keep their names, so
    # a checkpoint saved with the other order loads
    assert pools_before_relu and all(isinstance(model[i + 1], nn.ReLU) for i in pools_before_relu)
    (logits, input_grad, grads), (ref_logits, ref_input_grad, ref_grads) = results
    assert torch.equal(logits, ref_logits) and torch.equal(input_grad, ref_input_grad)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert model.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():  # the ReLUs after pooling do cut something
        assert all((model[:i + 1](x) < 0).any() for i in pools_before_relu)


def test_exact_parameter_counts() -> None:
    # exact figures of the reference implementations (fast_adversarial's PreActResNet18 with its
    # final BN; RobustBench's WideResNet-28-10 / -34-10)
    assert _count(PreActResNet((2, 2, 2, 2), num_classes=10)) == 11_172_170
    assert _count(WideResNet(28, 10, num_classes=10)) == 36_479_194
    assert _count(WideResNet(34, 10, num_classes=10)) == 46_160_474


def test_wideresnet_general_class_is_consistent_with_registry() -> None:
    registered = build_model("wrn-28-10", (3, 32, 32), 10)
    assert isinstance(registered, WideResNet)
    assert (registered.depth, registered.widen_factor) == (28, 10)
    assert _count(WideResNet(16, 4, num_classes=10)) == pytest.approx(2.75e6, rel=0.01)


@pytest.mark.parametrize("depth", [27, 30, 4, 0, -2])
def test_wideresnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ConfigError, match=str(depth)):
        WideResNet(depth=depth, widen_factor=1)


@pytest.mark.parametrize("name", ["preact-resnet18", "wrn-28-10", "wrn-34-10"])
@pytest.mark.parametrize("input_shape", [(30,), (28, 28), (1, 3, 32, 32)])
def test_image_models_reject_non_image_shapes(name: str, input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        build_model(name, input_shape, 10)
    assert str(input_shape) in str(info.value)


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet-9000", (3, 32, 32), 10)
    message = str(info.value)
    assert "resnet-9000" in message
    for name in EXPECTED_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("name", "input_shape", "mean", "std"),
    [
        ("small-cnn", (3, 16, 16), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
        ("small-cnn", (1, 8, 8), (0.1307,), (0.3081,)),
        ("preact-resnet18", (3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    ],
)
def test_normalize_equals_bare_model_on_standardised_input(
        name: str, input_shape: tuple[int, ...], mean: tuple[float, ...],
        std: tuple[float, ...]) -> None:
    torch.manual_seed(1)
    wrapped = build_model(name, input_shape, 10, mean=mean, std=std)
    torch.manual_seed(1)
    bare = build_model(name, input_shape, 10)
    assert isinstance(wrapped, Normalize)
    wrapped.eval()
    bare.eval()
    x = torch.rand(4, *input_shape)
    shape = (1, len(mean), 1, 1)
    standardised = (x - torch.tensor(mean).reshape(shape)) / torch.tensor(std).reshape(shape)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), bare(standardised))
        torch.testing.assert_close(wrapped(x), wrapped.model(standardised))


def test_normalize_only_when_both_mean_and_std_given() -> None:
    assert isinstance(build_model("linear", (1, 8, 8), 10, mean=(0.5,), std=(0.2,)), Normalize)
    assert not isinstance(build_model("linear", (1, 8, 8), 10), Normalize)
    with pytest.raises(ConfigError, match="give mean and std together"):
        build_model("linear", (1, 8, 8), 10, mean=(0.5,))  # it used to be dropped without a word


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"num_classes": 2.7}, "num_classes must be a whole number >= 2, got 2.7"),
    ({"num_classes": True}, "num_classes must be a whole number >= 2"),
    ({"num_classes": 0}, "num_classes must be a whole number >= 2"),
    ({"input_shape": ()}, "input_shape must be whole numbers >= 1"),
    ({"input_shape": (0, 8, 8)}, "input_shape must be whole numbers >= 1"),
    ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, "one value per channel: the input (1, 8, 8) has 1, got 2"),
    ({"mean": (0.5,), "std": (float("nan"),)}, "finite values and std > 0"),
    ({"mean": (float("inf"),), "std": (0.2,)}, "finite values and std > 0"),
], ids=["classes-fraction", "classes-bool", "classes-zero", "shape-empty", "shape-zero", "mean-length",
        "std-nan", "mean-inf"])
def test_build_model_refuses_settings_that_make_no_model(arguments, fragment) -> None:
    settings = {"input_shape": (1, 8, 8), "num_classes": 10, **arguments}
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build_model("small-cnn", settings.pop("input_shape"), settings.pop("num_classes"), **settings)


def test_normalize_keeps_input_gradient() -> None:
    model = build_model("small-cnn", (1, 8, 8), 10, mean=(0.5,), std=(0.25,))
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_preact_blocks_convolve_pre_activated_inputs_and_the_head_sees_bn_relu() -> None:
    # He et al. 2016 (identity mappings): BN-ReLU before each conv, the projection shortcut on the
    # pre-activated input, and a final BN-ReLU before pooling. A post-activation block has the same
    # parameter count, so only the order of operations tells them apart.
    torch.manual_seed(0)
    model = PreActResNet(blocks=(1, 1), widths=(8, 16), in_channels=3, num_classes=4).eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
             for name, module in model.named_modules()
             if name.endswith(("conv1", "conv2", "shortcut")) and name != "conv1" or name == "pool"]
    model(torch.randn(2, 3, 8, 8))
    for hook in hooks:
        hook.remove()
    assert {"layers.1.0.shortcut", "layers.0.0.conv2", "pool"} <= set(seen)
    assert all(bool((tensor >= 0).all()) for tensor in seen.values()), \
        [name for name, tensor in seen.items() if bool((tensor < 0).any())]
