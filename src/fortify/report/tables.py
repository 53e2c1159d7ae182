"""The report's tables over several models, keyed by attack (name and mode) and by eps.

Models on one page (a run's models, or several runs merged by ``fortify compare``) need not share
their attacks, the order of those attacks, their eps grids or their example counts. Every table
here therefore lines its cells up by key, never by position: the columns are the union over the
models, and a model that lacks a key gets ``None``, which the page prints as "n/a".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Models = dict[str, dict[str, Any]]


def eps_key(eps: float | None) -> float | None:
    """eps values from different grids meet when they agree to 10 digits (0.1 and 0.1 + 1e-17)."""
    return None if eps is None else float(f"{eps:.10g}")


def _sorted_eps(keys: Iterable[float | None]) -> list[float | None]:
    """Ascending, without repeats; an unknown eps (null in the results) last."""
    unique = set(keys)
    return sorted(k for k in unique if k is not None) + ([None] if None in unique else [])


CASCADE = "cascade"


def attack_key(attack: dict[str, Any]) -> str:
    """The column an attack's accuracy goes under: its name, marked when it ran in a cascade.

    A cascade's accuracy is cumulative (robust under this attack and every earlier one), so it must
    never share a column with the same attack run on its own ('fgsm' against 'fgsm (cascade)').
    """
    return f"{attack['name']} ({CASCADE})" if attack.get("mode") == CASCADE else attack["name"]


def attacks_by_name(robustness: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A model's attacks by ``attack_key``; a key used twice gets its occurrence appended ('pgd (2)')."""
    named: dict[str, dict[str, Any]] = {}
    for attack in robustness["attacks"]:
        key = name = attack_key(attack)
        count = 1
        while name in named:
            count += 1
            name = f"{key} ({count})"
        named[name] = attack
    return named


def has_cascade(models: Models) -> bool:
    """Whether any model's attacks ran as a cascade (the page then explains the marked columns)."""
    return any(a.get("mode") == CASCADE for m in models.values() for a in m["robustness"]["attacks"])


def attack_accuracy(models: Models) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Attack columns (first seen first) and, per model, its adversarial accuracy under each."""
    per_model = {name: attacks_by_name(m["robustness"]) for name, m in models.items()}
    columns = list(dict.fromkeys(a for attacks in per_model.values() for a in attacks))
    accuracy = {name: {a: attacks[a]["adversarial_accuracy"] if a in attacks else None for a in columns}
                for name, attacks in per_model.items()}
    return columns, accuracy


def eps_curve_rows(models: Models) -> list[dict[str, Any]]:
    """One row per eps of any model's curve: ``{"eps", "accuracy": {model: accuracy or None}}``."""
    curves = {name: {eps_key(p["eps"]): p["accuracy"] for p in m["robustness"].get("eps_curve") or []}
              for name, m in models.items()}
    grid = _sorted_eps(e for curve in curves.values() for e in curve)
    return [{"eps": e, "accuracy": {name: curve.get(e) for name, curve in curves.items()}} for e in grid]


def eps_curve_attacks(models: Models) -> dict[str, str]:
    """The attack each model's eps curve was drawn with (models without a curve left out)."""
    return {name: m["robustness"]["eps_curve_attack"] for name, m in models.items()
            if m["robustness"].get("eps_curve_attack")}


EpsMap = dict[float | None, float | None]


def margin_shares(models: Models, analysed: list[str]) -> tuple[list[float | None], dict[str, EpsMap]]:
    """The eps columns of the margin table and, per analysed model, its share of margins <= each."""
    shares: dict[str, EpsMap] = {}
    for name in analysed:
        summary = models[name]["analysis"]["margin"]["summary"]
        shares[name] = {eps_key(e): f for e, f in zip(summary["eps"], summary["fraction_below"])}
    columns = _sorted_eps(e for per_eps in shares.values() for e in per_eps)
    return columns, {name: {e: per_eps.get(e) for e in columns} for name, per_eps in shares.items()}


def example_counts(models: Models) -> dict[str, Any]:
    """Test examples each model was evaluated on."""
    return {name: m["robustness"]["n_examples"] for name, m in models.items()}


def attack_settings(models: Models) -> list[dict[str, Any]]:
    """One row per attack and distinct settings: ``{"attack", "settings", "models"}``.

    Models that ran an attack with the same settings share a row; ``models`` lists them.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, m in models.items():
        for attack, entry in attacks_by_name(m["robustness"]).items():
            key = (attack, json.dumps(entry["settings"], sort_keys=True, default=str))
            row = rows.setdefault(key, {"attack": attack, "settings": entry["settings"], "models": []})
            row["models"].append(name)
    order = list(dict.fromkeys(attack for attack, _ in rows))
    return sorted(rows.values(), key=lambda row: order.index(row["attack"]))
