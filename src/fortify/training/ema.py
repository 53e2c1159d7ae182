"""Exponential moving average of the weights (Polyak averaging), for evaluation.

Averaged weights are smoother than the last iterate and, in adversarial training, often more
robust (Gowal et al. 2020 use decay 0.995 per step). ``update()`` after every optimiser step;
``with ema.applied():`` evaluates the averaged weights and puts the trained ones back, bit-exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fortify.errors import CheckpointError, ConfigError


class ModelEMA:
    """``shadow <- decay * shadow + (1 - decay) * weights`` over the model's whole state.

    Floating-point parameters and buffers (BatchNorm running statistics) are averaged; integer
    buffers (BatchNorm's batch counter) are copied. Decay 0 follows the model exactly, decay 1
    keeps the weights from construction time.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay!r}")
        self.model = model
        self.decay = float(decay)
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        # lerp's endpoints are exact: weight 1 returns the end, weight 0 the start
        for name, value in self.model.state_dict().items():
            average = self.shadow[name]
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(value)

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Load the averaged weights into ``model`` (default: the tracked model)."""
        (self.model if model is None else model).load_state_dict(self.shadow)

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The tracked model with the averaged weights swapped in; restored on exit."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.copy_to()
        try:
            yield self.model
        finally:
            self.model.load_state_dict(saved)

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        return {f"ema.{k}": v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load an average saved by ``state_dict``; names and shapes must match the model's exactly."""
        missing = [k for k in self.shadow if f"ema.{k}" not in state]
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} entries, e.g. {missing[0]!r}")
        # copy_ broadcasts, so an average of another model (a bias of shape (1,), say) would load silently
        unexpected = sorted(set(state) - {f"ema.{k}" for k in self.shadow})
        wrong_shape = [k for k, v in self.shadow.items() if state[f"ema.{k}"].shape != v.shape]
        if unexpected or wrong_shape:
            raise CheckpointError(f"EMA state does not fit this model: unexpected {unexpected[:5]}, "
                                  f"wrong shape {wrong_shape[:5]}")
        with torch.no_grad():
            for name, average in self.shadow.items():
                average.copy_(state[f"ema.{name}"])
