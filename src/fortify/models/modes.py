"""A model's train/eval modes, kept across work that needs eval mode (attacks, evaluation, checks).

``model.train(was_training)`` afterwards is not enough: it sets every submodule alike, so a frozen
batch-norm inside a model in training mode, or a dropout left on for Monte-Carlo sampling in an
evaluated one, would come back changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fortify.models.normalize import Normalize

# Layers whose forward pass never reads ``self.training``: a model built from these alone, in any
# nesting of nn.Sequential, computes the same function in training and in eval mode. The types are
# matched exactly, since a subclass may override ``forward``.
_MODE_INDEPENDENT_TYPES = frozenset({
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten, Normalize,
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus,
})
# the attribute that marks a forward hook as changing no value (value_preserving): fortify's own
# layout hook (models.layout) and its pass counters; any other hook may read the mode
_VALUE_PRESERVING = "fortify_value_preserving"

Modes = list[tuple[nn.Module, bool]]


def save_modes(model: nn.Module) -> Modes:
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: Modes) -> None:
    top, top_mode = modes[0]
    top.train(top_mode)  # the model's own train(), which a wrapper may extend (fortify.training.dp)
    for module, mode in modes[1:]:
        module.training = mode  # the flag alone: calling train() would reset the module's children


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration; afterwards every submodule has its own mode back."""
    modes = save_modes(model)
    model.eval()
    try:
        yield
    finally:
        restore_modes(modes)


@contextlib.contextmanager
def probing(model: nn.Module, *, training: bool, device: torch.device) -> Iterator[None]:
    """For a trial forward pass of ``model`` (in ``training`` or eval mode) that changes nothing:
    afterwards the modes, the buffers (batch-norm statistics) and, in training mode, the random
    generators on the CPU and ``device`` (dropout's draws) are as they were."""
    modes = save_modes(model)
    model.train(training)
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()] if training else []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=training):
            yield
    finally:
        restore_modes(modes)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def runs_alike_in_both_modes(model: nn.Module) -> bool:
    """Whether ``model`` is known to compute the same function in training and in eval mode.

    True only for a model made of the layers listed above, and of modules whose class declares
    ``mode_independent = True`` (its own ``forward`` never reads ``self.training``; its children
    are checked in turn), with no forward hooks, on the modules or global, other than those marked
    ``value_preserving``. Anything else (batch norm, dropout, a module with an undeclared ``forward``
    of its own or one replaced on the instance, a wrapper such as DDP, Opacus or ``torch.compile``)
    counts as mode-dependent.
    """
    global_hooks = [*nn.modules.module._global_forward_pre_hooks.values(),
                    *nn.modules.module._global_forward_hooks.values()]
    return not _any_unmarked(global_hooks) and all(
        _declared_or_listed(module) and not _has_foreign_hooks(module) for module in model.modules())


def value_preserving(hook: Callable[..., object]) -> Callable[..., object]:
    """Mark a forward hook as changing no value in any mode, so that a model it is registered on (or
    a global hook) still counts as running alike in both modes; returns ``hook``."""
    setattr(hook, _VALUE_PRESERVING, True)
    return hook


def _declared_or_listed(module: nn.Module) -> bool:
    if "forward" in vars(module):  # replaced on the instance (accelerate's hooks do): unknown code
        return False
    return type(module) in _MODE_INDEPENDENT_TYPES or vars(type(module)).get("mode_independent") is True


def _has_foreign_hooks(module: nn.Module) -> bool:
    return _any_unmarked([*module._forward_pre_hooks.values(), *module._forward_hooks.values()])


def _any_unmarked(hooks: list[Callable[..., object]]) -> bool:
    return any(getattr(hook, _VALUE_PRESERVING, False) is not True for hook in hooks)
