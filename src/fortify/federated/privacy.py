"""What a curious server learns from one client's update.

A client that takes ``local_steps`` plain SGD steps of learning rate ``lr`` (no momentum carried
in, no weight decay) sends ``w_local = w_global - lr * (g_1 + ... + g_k)``, so the server reads off
the mean gradient ``(w_global - w_local) / (lr * local_steps)``. One step of SGD with momentum and
weight decay ``wd`` (the training defaults; each round starts a fresh optimizer, so the first
step's momentum buffer is the step's own gradient) sends ``w_global - lr * (g + wd * w_global)``,
from which the server subtracts the decay it knows. For one step on one batch that is exactly the
batch's gradient, which the reconstruction attacks of ``fortify.privacy.reconstruction``
turn back into the client's inputs (the multi-step case is the setting of Geiping et al. 2020).
The client took it in training mode: for a model with batch norm pass ``batch_statistics=True``,
so that the attack's trial gradients normalise by their batch as the client's did. Dropout masks
are the client's own draws; the attack runs without dropout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from torch import Tensor, nn

from fortify.config import DPConfig
from fortify.errors import ConfigError, DataError
from fortify.privacy.reconstruction import GradientReconstruction, reconstruct


def update_to_gradient(model: nn.Module, global_state: Mapping[str, Tensor],
                       local_state: Mapping[str, Tensor], *, lr: float, local_steps: int = 1,
                       weight_decay: float = 0.0) -> list[Tensor]:
    """The mean local gradient implied by an update, in the order of ``model``'s trainable
    parameters (the order ``reconstruct`` expects). ``weight_decay`` (SGD's, coupled to the
    gradient) is undone for one local step: after more, it was applied to weights the server never
    saw."""
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if local_steps < 1:
        raise ConfigError(f"local_steps must be >= 1, got {local_steps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be finite and >= 0, got {weight_decay}")
    if weight_decay > 0 and local_steps > 1:
        raise ConfigError(f"weight decay can be undone for one local step only, got local_steps="
                          f"{local_steps}: after the first step it applies to local weights the server "
                          "never received")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in global_state or n not in local_state]
    if missing:
        raise DataError(f"the update lacks the model's parameters {missing[:3]}; valid names: "
                        f"{', '.join(names)}")
    return [(global_state[n] - local_state[n]) / (lr * local_steps) - weight_decay * global_state[n]
            for n in names]


def reconstruct_from_update(model: nn.Module, global_state: Mapping[str, Tensor],
                            local_state: Mapping[str, Tensor], input_shape: Sequence[int], *, lr: float,
                            local_steps: int = 1, weight_decay: float = 0.0, batch_size: int = 1,
                            **options: Any) -> GradientReconstruction:
    """Run a reconstruction attack on the gradient an update implies; ``model`` must hold the
    global weights (the server's copy). ``options`` go to ``reconstruct`` (method, steps, labels,
    label_smoothing, ...)."""
    gradient = update_to_gradient(model, global_state, local_state, lr=lr, local_steps=local_steps,
                                  weight_decay=weight_decay)
    return reconstruct(model, gradient, input_shape, batch_size=batch_size, **options)


ACCOUNTANTS = get_args(DPConfig.model_fields["accountant"].annotation)  # what dp.accountant accepts


def composed_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     accountant: str = "prv") -> float:
    """Epsilon of ``steps`` DP-SGD steps at one noise level and sample rate, by Opacus' ``accountant``
    (``prv`` or ``rdp``: the one the clients' DP-SGD trainers use, so that one round's value is
    what a client's own trainer reports).

    A client that trained in rounds 1..r with the same settings took r times one round's steps, so
    this is its privacy over the whole federation so far, not only the last round.
    """
    from fortify.training.dp import spent_epsilon

    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    if noise_multiplier == 0:
        return math.inf
    if steps == 0:
        return 0.0
    return spent_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)
