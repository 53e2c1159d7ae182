"""Which features an attack changed, and how often: the data behind the report's bar chart."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fortify.errors import DataError
from fortify.tabular.schema import Schema

# A continuous feature counts as changed when it moved at least this share of its range; smaller
# moves are everywhere after a gradient attack and would paint every bar full
MIN_CHANGE = 0.01


@dataclass
class FeatureChanges:
    """Per feature (schema order), in how many of ``examples`` adversarial points it changed."""

    attack: str
    examples: int
    counts: dict[str, int]

    @property
    def rates(self) -> dict[str, float]:
        total = self.examples
        return {name: (count / total if total else 0.0) for name, count in self.counts.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rates": self.rates}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureChanges:
        return cls(attack=data["attack"], examples=int(data["examples"]),
                   counts={str(k): int(v) for k, v in data["counts"].items()})


def changed_features(schema: Schema, x: Tensor, x_adv: Tensor, min_change: float = MIN_CHANGE) -> Tensor:
    """(N, F) bool: the feature changed. Whole numbers and categories: any change; continuous:
    a change of at least ``min_change`` of the range."""
    if x.shape != x_adv.shape or x.dim() != 2 or x.shape[1] != schema.n_columns:
        raise DataError(f"expected two (N, {schema.n_columns}) batches, got {tuple(x.shape)} and "
                        f"{tuple(x_adv.shape)}")
    delta = (x_adv.double() - x.double()).abs()
    columns = []
    for index, feature in enumerate(schema.features):
        moved = delta[:, schema.columns(index)].amax(dim=1)
        # half a grid step (or half a one-hot flip) separates a real change from float noise
        threshold = 0.5 / feature.span if feature.type in ("integer", "binary") else (
            0.5 if feature.type == "categorical" else min_change)
        columns.append(moved >= threshold)
    return torch.stack(columns, dim=1)


def count_feature_changes(schema: Schema, x: Tensor, x_adv: Tensor, *, attack: str,
                          only: Tensor | None = None, min_change: float = MIN_CHANGE) -> FeatureChanges:
    """Count changed features over the rows of ``x_adv`` (only those marked in ``only`` if given)."""
    changed = changed_features(schema, x, x_adv, min_change)
    if only is not None:
        changed = changed[only]
    totals = changed.sum(dim=0).tolist()
    return FeatureChanges(attack=attack, examples=int(changed.shape[0]),
                          counts={f.name: int(c) for f, c in zip(schema.features, totals)})
