"""The evaluation's eps curve reruns one cheap gradient attack, whatever the attack list."""

from __future__ import annotations

import pytest

from fortify.config import config_from_dict
from fortify.pipeline import evaluate_model, prepare


@pytest.mark.parametrize(("evaluation", "expected"), [
    ({"preset": "autoattack"}, "apgd-ce"),  # was square: 5,000 queries per example at every eps
    ({"attacks": ["fgsm", "pgd", "square"]}, "pgd"),
    ({"attacks": ["fgsm", "square"]}, "square"),
])
def test_the_eps_curve_reruns_pgd_else_apgd_else_the_last_attack(standard_model, evaluation, expected):
    config = config_from_dict({"data": {"name": "digits"}, "model": {"name": "small-cnn"},
                               "eval": {"n_examples": 8, "steps": 2, "queries": 5, **evaluation}})
    report = evaluate_model(prepare(config, "cpu"), standard_model)
    assert report.eps_curve_attack.startswith(expected)


@pytest.mark.parametrize(("grid", "points"), [([], 0), (None, 6), ([0.05, 0.1], 2)])
def test_an_empty_eps_grid_asks_for_no_curve(standard_model, grid, points):
    # [] was replaced by the default six points, beside eps_grid: [] in robustness.json
    evaluation = {"n_examples": 8, "steps": 2, "attacks": ["pgd"]}
    if grid is not None:
        evaluation["eps_grid"] = grid
    config = config_from_dict({"data": {"name": "digits"}, "model": {"name": "small-cnn"},
                               "eval": evaluation})
    report = evaluate_model(prepare(config, "cpu"), standard_model)
    assert len(report.eps_curve) == points
