"""Robust accuracy per constraint setting, and which features the attacks changed.

The same model is attacked under three threat models of the same norm and eps, from loosest to
tightest, so the report shows what each layer of realism takes away from the attacker:

- ``box``: the plain ThreatModel on the [0, 1] encoding: every column free, fractional values and
  broken one-hot groups allowed (the usual, unrealistic image-style threat);
- ``types``: the schema's types, bounds and costs, with every feature mutable in any direction;
- ``schema``: the full schema (mutability and directions too).

Attacks: PGD and APGD-CE in every setting, feature search in the two schema settings. A setting's
worst case counts an example robust only if every attack failed on it. Every point is checked
against its setting's threat model before it counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from fortify.attacks import APGD, PGD, Attack
from fortify.errors import ThreatModelViolation
from fortify.models.modes import restore_modes, save_modes
from fortify.models.predictions import predicted_class
from fortify.tabular.changes import FeatureChanges, count_feature_changes
from fortify.tabular.constraints import ConstrainedThreatModel
from fortify.tabular.search import FeatureSearch
from fortify.threat import ThreatModel

SETTINGS: tuple[str, ...] = ("box", "types", "schema")


@dataclass
class SettingResult:
    setting: str
    threat: str
    accuracy: dict[str, float]  # per attack label, over all examples
    worst_case_accuracy: float


@dataclass
class ConstraintStudy:
    n_examples: int
    clean_accuracy: float
    settings: list[SettingResult]
    feature_changes: list[FeatureChanges] = field(default_factory=list)  # per attack, 'schema' setting

    def to_dict(self) -> dict[str, Any]:
        return {"n_examples": self.n_examples, "clean_accuracy": self.clean_accuracy,
                "settings": [asdict(s) for s in self.settings],
                "feature_changes": [c.to_dict() for c in self.feature_changes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConstraintStudy:
        return cls(n_examples=data["n_examples"], clean_accuracy=data["clean_accuracy"],
                   settings=[SettingResult(**s) for s in data["settings"]],
                   feature_changes=[FeatureChanges.from_dict(c) for c in data["feature_changes"]])

    def setting(self, name: str) -> SettingResult:
        for result in self.settings:
            if result.setting == name:
                return result
        raise KeyError(name)


def constraint_settings(threat: ConstrainedThreatModel) -> dict[str, ThreatModel]:
    relaxed = threat.schema.replace_features(mutable=True, direction="any")
    # feature costs let a constrained eps exceed the box's diameter, where the plain ball holds
    # the whole box: capped at the diameter, the box setting is the same set of points
    diameter = 1.0 if threat.norm == "linf" else math.sqrt(threat.schema.n_columns)
    return {"box": ThreatModel(threat.norm, min(threat.eps, diameter), (0.0, 1.0)),
            "types": replace(threat, schema=relaxed, _layouts={}),
            "schema": threat}


def study_attacks(threat: ThreatModel, *, steps: int = 20, seed: int = 0) -> list[Attack]:
    # PGD as the evaluation builds it: with the probe at FGSM's corner, which under a schema
    # rounds whole numbers and categories that PGD's small steps do not move
    attacks: list[Attack] = [PGD(threat, steps=steps, early_stop=True, probe=True, seed=seed),
                             APGD(threat, n_iter=max(steps, 10), early_stop=True, seed=seed + 1)]
    if isinstance(threat, ConstrainedThreatModel):
        attacks.append(FeatureSearch(threat, seed=seed + 2))
    return attacks


def study_constraints(model: nn.Module, x: Tensor, y: Tensor, threat: ConstrainedThreatModel, *,
                      steps: int = 20, batch_size: int = 256, seed: int = 0) -> ConstraintStudy:
    """Attack ``model`` on ``(x, y)`` under each setting; count feature changes under the schema."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    modes = save_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            clean = _predict(model, x, batch_size) == y
        settings, changes = [], []
        for name, setting_threat in constraint_settings(threat).items():
            robust_all = clean.clone()
            accuracy = {}
            for attack in study_attacks(setting_threat, steps=steps, seed=seed):
                x_adv = _attack(model, attack, x, y, batch_size)
                with torch.no_grad():
                    robust = clean & (_predict(model, x_adv, batch_size) == y)
                accuracy[attack.label] = float(robust.float().mean())
                robust_all &= robust
                if name == "schema":
                    changes.append(count_feature_changes(threat.schema, x, x_adv, attack=attack.label,
                                                         only=clean & ~robust))
            settings.append(SettingResult(name, setting_threat.describe(), accuracy,
                                          float(robust_all.float().mean())))
    finally:
        restore_modes(modes)
    return ConstraintStudy(len(y), float(clean.float().mean()), settings, changes)


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([predicted_class(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _attack(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    generator = torch.Generator(device=x.device).manual_seed(attack.seed)
    parts = []
    for start in range(0, len(x), batch_size):
        chunk = slice(start, start + batch_size)
        x_adv = attack(model, x[chunk], y[chunk], generator=generator)
        inside = attack.threat.contains(x_adv, x[chunk])
        if not bool(inside.all()):
            raise ThreatModelViolation(f"attack {attack.label!r} returned {int((~inside).sum())} point(s) "
                                       f"outside {attack.threat.describe()}; its result is refused")
        parts.append(x_adv)
    return torch.cat(parts)
