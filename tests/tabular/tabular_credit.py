"""Synthetic credit tables built on the fly: ages, incomes, counts, categories and a default label.

Two immutable features (age, late payments) carry a robust signal; six mutable ``spend_*`` scores
carry a weak signal each (class means 0.05 apart) that together predict well but that an attacker
with eps >= 0.1 can reverse. That is the setting where a standard model is broken and constrained
adversarial training has something robust to learn.
"""

from __future__ import annotations

import numpy as np

from fortify.tabular.schema import Feature, Schema

SPEND = [f"spend_{i}" for i in range(6)]


def credit_schema() -> Schema:
    features = [
        Feature("age", "integer", 18, 80, mutable=False),
        Feature("income", "continuous", 0, 200_000),
        Feature("accounts", "integer", 0, 20, direction="increase"),
        Feature("late_payments", "integer", 0, 10, mutable=False),
        Feature("housing", "categorical", categories=("own", "rent", "other"), cost=0.1),
        Feature("guarantor", "binary", cost=0.1),
        *[Feature(name, "continuous", 0, 1) for name in SPEND],
    ]
    return Schema(tuple(features), target="default")


def credit_table(n: int, seed: int = 0) -> dict[str, list]:
    """Raw columns (name -> values) of ``n`` applicants, about half of whom default."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    table: dict[str, list] = {
        "age": np.clip(np.where(y == 1, rng.normal(32, 8, n), rng.normal(47, 10, n)), 18, 80).round(),
        "income": np.clip(rng.normal(np.where(y == 1, 45_000, 60_000), 20_000), 0, 200_000).round(2),
        "accounts": np.clip(rng.poisson(3, n), 0, 20),
        "late_payments": np.clip(rng.poisson(np.where(y == 1, 2.5, 0.7)), 0, 10),
        "housing": [rng.choice(["own", "rent", "other"], p=[0.3, 0.5, 0.2] if label else [0.6, 0.3, 0.1])
                    for label in y],
        "guarantor": (rng.random(n) < np.where(y == 1, 0.2, 0.4)).astype(int),
    }
    for name in SPEND:
        table[name] = np.clip(rng.normal(0.5 + 0.05 * (2 * y - 1), 0.1), 0, 1)
    table["default"] = y
    return {k: list(v) for k, v in table.items()}


def write_csv(path, table: dict[str, list]) -> None:
    names = list(table)
    rows = range(len(table[names[0]]))
    lines = [",".join(names)] + [",".join(str(table[c][i]) for c in names) for i in rows]
    path.write_text("\n".join(lines) + "\n")
