"""Which models compute the same function in training and in eval mode (``runs_alike_in_both_modes``)."""

from __future__ import annotations

import pytest
from torch import nn

from fortify.models import Normalize, build_model
from fortify.models.layout import channels_last
from fortify.models.modes import runs_alike_in_both_modes, value_preserving


class _OwnForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) * (2.0 if self.training else 1.0)


class _LinearOfItsOwn(nn.Linear):
    def forward(self, x):
        return super().forward(x) + (1.0 if self.training else 0.0)


@pytest.mark.parametrize("make, alike", [
    (lambda: build_model("small-cnn", (1, 8, 8), 3), True),
    (lambda: Normalize(build_model("mlp", (1, 8, 8), 3), [0.5], [0.2]), True),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 2)), True),
    (lambda: build_model("preact-resnet18", (3, 32, 32), 10), False),  # batch norm
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)), False),
    (lambda: nn.Sequential(nn.Linear(4, 4), _OwnForward()), False),  # a forward of its own
    (lambda: nn.Sequential(_LinearOfItsOwn(4, 2)), False),  # a subclass of a listed layer
])
def test_only_models_of_mode_independent_layers_count_as_running_alike(make, alike):
    assert runs_alike_in_both_modes(make()) is alike


def test_a_hook_of_the_callers_makes_a_model_mode_dependent_and_fortifys_layout_hook_does_not():
    model = build_model("small-cnn", (1, 8, 8), 3)
    with channels_last(model):
        assert runs_alike_in_both_modes(model)  # the nn.Flatten gradient hook changes no value
    handle = model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    assert not runs_alike_in_both_modes(model)
    handle.remove()
    assert runs_alike_in_both_modes(model)


class _Declared(nn.Module):
    mode_independent = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _InheritsTheDeclaration(_Declared):
    def forward(self, x):
        return self.inner(x) * (2.0 if self.training else 1.0)


def test_a_module_of_its_own_may_declare_itself_mode_independent_for_itself_alone():
    assert runs_alike_in_both_modes(_Declared(nn.Linear(4, 2)))
    assert not runs_alike_in_both_modes(_Declared(nn.Dropout(0.1)))  # its children are still checked
    assert not runs_alike_in_both_modes(_InheritsTheDeclaration(nn.Linear(4, 2)))  # a subclass must say so


def test_a_forward_replaced_on_the_instance_makes_a_model_mode_dependent():
    # the type is still nn.Linear, but the code that runs is the caller's (accelerate's hooks do this)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    inner = model[1].forward
    model[1].forward = lambda x: inner(x) * (2.0 if model[1].training else 1.0)
    assert not runs_alike_in_both_modes(model)


def test_global_hooks_make_every_model_mode_dependent_unless_marked_value_preserving():
    model = build_model("small-cnn", (1, 8, 8), 3)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: output * (2.0 if module.training else 1.0))
    try:
        assert not runs_alike_in_both_modes(model)
    finally:
        handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(value_preserving(lambda module, inputs: None))
    try:
        assert runs_alike_in_both_modes(model)
    finally:
        handle.remove()


def test_a_hook_is_known_by_its_mark_not_by_its_name():
    # a caller's hook named like fortify's layout hook used to pass for it
    def _gradient_in_input_layout(module, inputs, output):
        return output * (2.0 if module.training else 1.0)

    model = build_model("small-cnn", (1, 8, 8), 3)
    model[0].register_forward_hook(_gradient_in_input_layout)
    assert not runs_alike_in_both_modes(model)
