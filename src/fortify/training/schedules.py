"""Learning-rate schedules as multipliers of the base rate over training progress in [0, 1].

The trainer sets the rate from the global step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fortify.registry import Registry

Schedule = Callable[[float], float]
SCHEDULES: Registry[Schedule] = Registry("schedule")


@SCHEDULES.register("constant")
def constant(progress: float) -> float:
    return 1.0


@SCHEDULES.register("piecewise")
def piecewise(progress: float) -> float:
    """Divide by 10 at half and at three quarters of training (Madry et al.; Rice et al.)."""
    return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01


@SCHEDULES.register("cosine")
def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@SCHEDULES.register("cyclic")
def cyclic(progress: float) -> float:
    """One triangle: 0 up to the peak at 40% of training, back to 0 (Wong et al. 2020).

    The Trainer reads it at the end of each step (``schedule_progress``), as Wong et al. do.
    """
    peak = 0.4
    return progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak))


# Schedules read at the end of a step rather than at its start: Wong et al. set the cyclic rate from
# (i + 1) / n, so the first step already moves the weights (read at its start, it would run at rate 0).
_READ_AT_STEP_END = frozenset({"cyclic"})


def schedule_progress(name: str, step: int, total_steps: int) -> float:
    """The training progress in [0, 1] that schedule ``name`` reads for the 0-based ``step``."""
    done = step + 1 if name in _READ_AT_STEP_END else step
    return done / total_steps
