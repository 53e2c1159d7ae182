"""Feature-change counts: exact on constructed changes, per feature, serialisable."""

from __future__ import annotations

import json

import torch
from tabular_credit import credit_table

from fortify.tabular import FeatureChanges, count_feature_changes


def test_counts_are_exact_and_round_trip(schema):
    x = schema.encode(credit_table(4))
    x_adv = x.clone()
    x_adv[0, 1] += 0.05  # income moved 5% of its range: counts
    x_adv[1, 1] += 0.001  # below the 1% threshold: float-sized noise for a continuous feature
    x_adv[1, 2] += 1 / 20  # one more account: any whole step counts
    hot = x_adv[2, 4:7].argmax()
    x_adv[2, 4:7] = torch.nn.functional.one_hot((hot + 1) % 3, 3).float()  # another housing category
    changes = count_feature_changes(schema, x, x_adv, attack="hand")
    assert changes.examples == 4
    assert changes.counts == {**dict.fromkeys(schema.names, 0), "income": 1, "accounts": 1, "housing": 1}
    first = torch.tensor([True, False, False, False])
    only_first = count_feature_changes(schema, x, x_adv, attack="hand", only=first)
    assert only_first.counts["income"] == 1 and only_first.counts["housing"] == 0
    assert only_first.rates["income"] == 1.0
    data = json.loads(json.dumps(changes.to_dict()))
    assert FeatureChanges.from_dict(data) == changes and data["rates"]["accounts"] == 0.25
