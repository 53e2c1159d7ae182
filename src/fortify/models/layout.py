"""Memory layout of a model's 4-D weights: channels_last (NHWC) for speed, and back.

oneDNN on CPUs and cuDNN on GPUs run convolutions, pooling and their gradients faster on
channels_last tensors; on CPU the NCHW max-pool that records indices for its gradient is the
slowest case (18x its channels_last time on a 256x64x8x8 batch). A convolution whose weight is
channels_last returns channels_last output whatever the layout of its input, so converting the
weights carries the whole network over; the inputs need not change.

For the duration, a hook on each ``nn.Flatten`` also hands the gradient back to its input in
channels_last order (see ``_gradient_in_input_layout``).

Only 4-D parameters and buffers are converted: channels_last has no meaning for other ranks
(``Module.to(memory_format=...)`` raises on a Conv3d's 5-D weight). A model that reshapes its
activations with ``Tensor.view`` fails on channels_last activations; ``channels_last(..., probe=x)``
turns that into a ConfigError before any work starts, and ``runs_channels_last`` tells beforehand
whether a model can (what the evaluation's automatic choice asks on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fortify.errors import ConfigError
from fortify.models.modes import probing, value_preserving

# (module, "_parameters" or "_buffers", name) -> the tensor held there before the conversion
_Saved = dict[tuple[nn.Module, str, str], Tensor]


def to_channels_last(model: nn.Module) -> _Saved:
    """Convert ``model``'s 4-D parameters and buffers to channels_last in place; returns what
    ``restore_layout`` needs to put the original tensors back. Parameters keep their identity
    (an optimiser holding them still steps the model's weights)."""
    saved: _Saved = {}
    # a tensor held by two modules (tied weights, a shared buffer) is converted once and stays shared
    converted_of: dict[int, Tensor] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            tensors: dict[str, Tensor | None] = getattr(module, kind)
            for name, tensor in tensors.items():
                if tensor is None or tensor.dim() != 4:
                    continue
                seen = id(tensor) in converted_of
                if not seen:
                    converted_of[id(tensor)] = _restrided(tensor.data)
                if kind == "_parameters":
                    if not seen:  # a shared Parameter is one object: its data is converted once
                        saved[(module, kind, name)] = tensor.data
                        tensor.data = converted_of[id(tensor)]
                else:
                    saved[(module, kind, name)] = tensor
                    tensors[name] = converted_of[id(tensor)]
    return saved


def _restrided(tensor: Tensor) -> Tensor:
    # .to (not .contiguous) restrides even a weight with one input channel, whose NCHW strides
    # already pass as channels_last: oneDNN reads the layout from the strides
    return tensor.to(memory_format=torch.channels_last)


def has_4d_tensors(model: nn.Module) -> bool:
    """Whether ``model`` has a 4-D parameter or buffer, the tensors ``to_channels_last`` converts."""
    return any(t.dim() == 4 for t in (*model.parameters(), *model.buffers()))


def to_contiguous(model: nn.Module) -> None:
    """Put ``model``'s 4-D parameters and buffers back in the default (NCHW) layout in place, keeping
    the values they hold: what a training run in channels_last hands back. Parameters keep their
    identity."""
    restrided_of: dict[int, Tensor] = {}  # a buffer held by two modules stays shared
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            tensors: dict[str, Tensor | None] = getattr(module, kind)
            for name, tensor in tensors.items():
                # strides compared, not is_contiguous(): a weight with one input channel passes as
                # both layouts, and oneDNN reads the layout from its strides
                if tensor is None or tensor.dim() != 4 or tensor.stride() == _default_strides(tensor):
                    continue
                if id(tensor) not in restrided_of:
                    restrided_of[id(tensor)] = tensor.detach().clone(memory_format=torch.contiguous_format)
                restrided = restrided_of[id(tensor)]
                if kind == "_parameters":
                    tensor.data = restrided
                else:
                    tensors[name] = restrided


def _default_strides(tensor: Tensor) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def restore_layout(saved: _Saved) -> None:
    """Undo ``to_channels_last``: each parameter gets its original data back, each buffer its
    original tensor (the values are those the model had before: nothing trained in between)."""
    for (module, kind, name), original in saved.items():
        if kind == "_parameters":
            module._parameters[name].data = original  # type: ignore[union-attr]
        else:
            module._buffers[name] = original


@contextlib.contextmanager
def channels_last(model: nn.Module, probe: Tensor | None = None) -> Iterator[nn.Module]:
    """``model`` with channels_last weights for the duration; its layout comes back afterwards.

    With ``probe`` (a batch of inputs) the model first runs once on it, so that a model that cannot
    run channels_last fails here with a ConfigError that says what to switch off.
    """
    saved = to_channels_last(model)
    try:
        with flatten_gradient_hooks(model):
            if probe is not None:
                _check_runs(model, probe)
            yield model
    finally:
        restore_layout(saved)


@contextlib.contextmanager
def flatten_gradient_hooks(model: nn.Module) -> Iterator[None]:
    """For the duration, each ``nn.Flatten`` of ``model`` hands the gradient back to a channels_last
    input in channels_last order (see ``_gradient_in_input_layout``); the hooks go afterwards."""
    hooks = [m.register_forward_pre_hook(_gradient_in_input_layout) for m in model.modules()
             if isinstance(m, nn.Flatten)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@value_preserving  # the model still runs alike in both modes (fortify.models.modes)
def _gradient_in_input_layout(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Forward pre-hook for ``nn.Flatten``: the gradient that flows back into a channels_last input
    arrives in NCHW order (the backward of a reshape), and the max-pool or convolution before it
    then takes oneDNN's slow path for mixed layouts; converting the gradient first is cheaper (a
    channels_last PGD run on digits took 0.93-0.95 of the time, the same points)."""
    (x,) = inputs
    if x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x.register_hook(_to_channels_last_gradient)


def _to_channels_last_gradient(grad: Tensor) -> Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def runs_channels_last(model: nn.Module, probe: Tensor, *, training: bool = False) -> bool:
    """Whether ``model`` has 4-D weights to convert and runs on ``probe`` with them channels_last;
    the model keeps its layout (and its batch-norm statistics) either way. Give two examples or more:
    a view that merges the batch axis with another (``h.view(n * c, -1)``) passes on one alone, whose
    batch axis of size 1 the stride check ignores. ``training`` runs it in training mode as well,
    for a model that takes another path there."""
    saved = to_channels_last(model)
    try:
        if not saved:
            return False
        _check_runs(model, probe)
        if training:
            _check_runs(model, probe, training=True)
        return True
    except ConfigError:
        return False
    finally:
        restore_layout(saved)


def _check_runs(model: nn.Module, probe: Tensor, *, training: bool = False) -> None:
    """One forward pass of ``model`` on ``probe`` in eval (or training) mode that changes nothing:
    batch-norm statistics and the random generators (dropout) come back as they were."""
    try:
        with probing(model, training=training, device=probe.device):
            model(probe)
    except RuntimeError as err:
        raise ConfigError(f"the model does not run with channels_last weights ({err}); "
                          "evaluate without channels_last") from err
