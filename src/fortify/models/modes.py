"""A model's train/eval modes, kept across work that needs eval mode (attacks, evaluation, checks).

``model.train(was_training)`` afterwards is not enough: it sets every submodule alike, so a frozen
batch-norm inside a model in training mode, or a dropout left on for Monte-Carlo sampling in an
evaluated one, would come back changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

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
