"""For tests that count how many forward passes an attack, evaluation or objective spends."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fortify.models.modes import value_preserving


class PassCounter(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = 0

    def forward(self, x: Tensor) -> Tensor:
        self.passes += 1
        return self.model(x)


def record_modes_of_passes(model: nn.Module) -> tuple[list[bool], Callable[[], None]]:
    """The training flag of each forward pass of ``model``, in order, and a function that stops the
    recording; the hook is marked as changing no value, so the model's mode check is unchanged
    (``fortify.models.modes``)."""
    modes: list[bool] = []

    @value_preserving
    def record(module: nn.Module, inputs: object, output: object) -> None:
        if module is model:
            modes.append(module.training)

    handle = nn.modules.module.register_module_forward_hook(record)
    return modes, handle.remove
