"""Constrained adversarial training through the usual Trainer and objectives, and the study that
reports robust accuracy per constraint setting and which features the attacks changed."""

from __future__ import annotations

import pytest
import torch
from tabular_credit import credit_table

from fortify.config import TrainConfig
from fortify.data.base import Split
from fortify.models import build_model
from fortify.tabular import ConstrainedThreatModel, study_constraints
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer


def _train(objective: str, threat: ConstrainedThreatModel, train: Split, val: Split) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", (threat.schema.n_columns,), 2)
    config = TrainConfig(objective=objective, epochs=10, early_stopping=False, attack_steps=5,
                         optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=64)
    Trainer(model, build_objective(objective, ObjectiveOptions(threat, attack_steps=5)), config,
            threat=threat, show_progress=False).fit(train, val)
    return model.eval()


@pytest.mark.slow
def test_constrained_training_raises_constrained_robust_accuracy(schema):
    # Prepare: a credit table whose mutable features carry a signal an eps=0.15 attacker can reverse
    table = credit_table(1100, seed=0)
    x, y = schema.encode(table), torch.tensor(table["default"])
    train, val, test = Split(x[:700], y[:700]), Split(x[700:850], y[700:850]), Split(x[850:], y[850:])
    threat = ConstrainedThreatModel("linf", 0.15, schema=schema)
    # Execute: a standard and a constrained-PGD model, then the study on each
    studies = {name: study_constraints(_train(name, threat, train, val), test.x, test.y, threat, steps=10)
               for name in ("standard", "pgd")}
    # Assert: the standard model is broken under the schema, the trained one is not
    standard, robust = (studies[n].setting("schema").worst_case_accuracy for n in ("standard", "pgd"))
    assert studies["standard"].clean_accuracy >= 0.85
    assert standard <= 0.35
    assert robust >= 0.7 and robust >= standard + 0.4
    for study in studies.values():
        box, types, full = (study.setting(s).worst_case_accuracy for s in ("box", "types", "schema"))
        assert box <= types <= full <= study.clean_accuracy  # each layer of constraints weakens the attacker
        for changes in study.feature_changes:
            assert changes.counts["age"] == changes.counts["late_payments"] == 0  # immutable
            assert changes.examples == round((study.clean_accuracy - study.setting("schema").accuracy[
                changes.attack]) * study.n_examples)
    assert max(c.counts["housing"] for c in studies["standard"].feature_changes) > 0
