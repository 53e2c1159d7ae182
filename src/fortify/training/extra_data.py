"""Extra-data mixing: a fixed share of every training batch drawn from a second dataset.

Gowal et al. (2021) and Rebuffi et al. (2021) gain robustness by training on generated images
besides the real ones, each batch holding a fixed fraction of generated examples. Here the extra
set is an ``.npz`` file with ``x`` and ``y`` of the dataset's shape, box and label range (read by
``fortify.data.npz``, so nothing is unpickled). An epoch still passes over the real training set
once; the extra examples are drawn with replacement by their own ``torch.Generator``, whose state
a checkpoint saves so a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fortify.attacks.base import check_label_range
from fortify.data.base import Split, host_to_device
from fortify.data.npz import read_arrays, read_layout, read_pair, require_file
from fortify.errors import ConfigError, DataError


def load_extra_data(path: Path | str, *, input_shape: tuple[int, ...], bounds: tuple[float, float],
                    num_classes: int) -> Split:
    """The extra examples of ``path``, refused unless they fit the dataset they join."""
    path = require_file(path)
    arrays = read_arrays(path)
    x, y = read_pair(arrays, "x", "y", bounds, read_layout(arrays))  # the file's own 'layout', as a dataset's
    if len(x) == 0:
        raise DataError(f"extra data {path} holds no examples")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"extra data {path}: inputs have shape {tuple(x.shape[1:])}, the dataset's "
                        f"have {tuple(input_shape)}; they must match")
    try:
        check_label_range(y, num_classes)
    except DataError as err:
        raise DataError(f"extra data {path}: {err}") from None
    return Split(x, y)


@dataclass(frozen=True)
class BatchPlan:
    """How many real and extra examples a full batch holds."""

    real: int
    extra: int

    @classmethod
    def for_batch(cls, batch_size: int, fraction: float) -> BatchPlan:
        if not 0 <= fraction < 1:
            raise ConfigError(f"extra_fraction must be in [0, 1), got {fraction!r}")
        extra = round(batch_size * fraction)
        if fraction > 0 and extra == 0:
            # otherwise the run would load extra_data and silently train on none of it
            raise ConfigError(f"extra_fraction={fraction} gives no extra example in a batch of {batch_size} "
                              f"(round({batch_size} * {fraction}) = 0); raise it above "
                              f"{0.5 / batch_size:g} or raise batch_size")
        if extra >= batch_size:
            raise ConfigError(f"extra_fraction={fraction} leaves no real example in a batch of "
                              f"{batch_size}; lower it or raise batch_size")
        return cls(batch_size - extra, extra)

    def extra_for(self, real: int) -> int:
        """Extra examples to add to ``real`` real ones (the last, smaller batch keeps the ratio)."""
        return self.extra if real == self.real else round(real * self.extra / self.real)


class ExtraDataMixer:
    """Appends extra examples to each batch of real ones, ``plan.extra`` per full batch."""

    def __init__(self, extra: Split, plan: BatchPlan, generator: torch.Generator) -> None:
        self.extra = extra
        self.plan = plan
        self.generator = generator

    def mix(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            count = self.plan.extra_for(len(x))
            index = host_to_device(torch.randint(len(self.extra), (count,), generator=self.generator),
                                   self.extra.x.device)
            yield torch.cat([x, self.extra.x[index]]), torch.cat([y, self.extra.y[index]])
