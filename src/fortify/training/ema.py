"""Exponential moving average of the weights (Polyak averaging), for evaluation.

Averaged weights are smoother than the last iterate and, in adversarial training, often more
robust (Gowal et al. 2020 use decay 0.995 per step). ``update()`` after every optimiser step;
``with ema.applied():`` evaluates the averaged weights and puts the trained ones back, bit-exact.

The decay ramps up with the number of updates: ``d_t = min(decay, (1 + t) / (10 + t))`` for the
update that follows ``t`` earlier ones. With a fixed decay the average starts at the random initial
weights and still holds ``decay^t`` of them after ``t`` steps (0.89 after 120 steps at 0.999), so a
short run would validate and save a model close to its initialisation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fortify.errors import CheckpointError, ConfigError
from fortify.threat import LOW_PRECISION

# The update counter's name in the saved state. State-dict keys are dotted names without empty
# parts, so "ema." + ".updates" can name no weight of any model.
UPDATES_KEY = "ema..updates"
# The counter an average saved without one (before the ramp existed) resumes with: there
# (1 + t) / (10 + t) rounds to 1.0, so the decay applies unramped, the rule that average was built with.
RAMP_OVER = 2**62


def ramped_decay(decay: float, updates: int) -> float:
    """The decay of the update after ``t = updates`` earlier ones: ``min(decay, (1 + t) / (10 + t))``.

    The schedule of TensorFlow's ``ExponentialMovingAverage(decay, num_updates)`` and the default of
    diffusers' ``EMAModel``. Alternatives considered: Adam-style debiasing (divide by ``1 - decay^t``)
    keeps the requested time scale from the start but needs a correction at every read of the
    average, and the ``1 - (1 + t / gamma)^-power`` warm-up (timm's ModelEmaV3) adds two settings.
    """
    return min(decay, (1 + updates) / (10 + updates))


class ModelEMA:
    """``shadow <- d_t * shadow + (1 - d_t) * weights`` over the model's whole state.

    Floating-point parameters and buffers (BatchNorm running statistics) are averaged, in float32
    for a bfloat16 or float16 model; integer buffers (BatchNorm's batch counter) are copied. ``d_t``
    is ``decay`` ramped up over the first updates (module docstring); with ``warmup=False`` it is
    ``decay`` from the first update. Decay 0 follows the model exactly. Decay 1 without warm-up keeps
    the weights from construction time; with warm-up it leaves the ramp alone, an average of the
    whole run weighted towards its recent steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay!r}")
        self.model = model
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: _average_of(v) for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next ``update()`` applies."""
        return ramped_decay(self.decay, self.updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        # lerp's endpoints are exact: weight 1 returns the end, weight 0 the start
        weight = 1.0 - self.current_decay()
        for name, value in self.model.state_dict().items():
            average = self.shadow[name]
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), weight)
            else:
                average.copy_(value)
        self.updates += 1

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
        """The average under ``ema.<name>`` and the update counter under ``UPDATES_KEY``."""
        state = {f"ema.{k}": v.clone() for k, v in self.shadow.items()}
        state[UPDATES_KEY] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load an average saved by ``state_dict``; names and shapes must match the model's exactly.

        A state without the update counter (saved before the decay ramped up) resumes with
        ``RAMP_OVER`` updates, so that it goes on averaging with the fixed decay it was built with.
        """
        missing = [k for k in self.shadow if f"ema.{k}" not in state]
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} entries, e.g. {missing[0]!r}")
        # copy_ broadcasts, so an average of another model (a bias of shape (1,), say) would load silently
        unexpected = sorted(set(state) - {f"ema.{k}" for k in self.shadow} - {UPDATES_KEY})
        wrong_shape = [k for k, v in self.shadow.items() if state[f"ema.{k}"].shape != v.shape]
        if unexpected or wrong_shape:
            raise CheckpointError(f"EMA state does not fit this model: unexpected {unexpected[:5]}, "
                                  f"wrong shape {wrong_shape[:5]}")
        updates = _saved_updates(state)
        with torch.no_grad():
            for name, average in self.shadow.items():
                average.copy_(state[f"ema.{name}"])
        self.updates = updates


def _average_of(value: Tensor) -> Tensor:
    """A copy of ``value`` to average into: float32 at least, since with a decay above about 0.996
    each step of a bfloat16 average (0.999 times the 8 bits of its mantissa) rounds back to where
    it was, and the average would stop following the weights."""
    copy = value.detach().clone()
    return copy.float() if copy.dtype in LOW_PRECISION else copy


def _saved_updates(state: dict[str, Tensor]) -> int:
    """The update counter in a saved EMA state; ``RAMP_OVER`` for a state saved without one."""
    counter = state.get(UPDATES_KEY)
    if counter is None:
        return RAMP_OVER
    if counter.shape != () or counter.dtype != torch.int64:
        raise CheckpointError(f"EMA update counter must be one int64, got a tensor of shape "
                              f"{tuple(counter.shape)} and dtype {counter.dtype}")
    updates = int(counter)
    if updates < 0:
        raise CheckpointError(f"EMA update counter must be >= 0, got {updates}")
    return updates
