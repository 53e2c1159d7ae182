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
    """One triangle: 0 up to the peak at 40% of training, back to 0 (Wong et al. 2020)."""
    peak = 0.4
    return progress / peak if progress < peak else max(0.0, (1 - progress) / (1 - peak))
