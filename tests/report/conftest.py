"""Results of a small comparison run, built once from the session's trained digits models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fortify.attacks import FGSM, PGD
from fortify.evaluation import evaluate
from fortify.evaluation.analysis import AnalysisOptions, analyse
from fortify.privacy.audit import audit_trained_model
from fortify.report.results import RESULTS_VERSION
from fortify.threat import ThreatModel

N_TEST = 80
OPTIONS = AnalysisOptions(margin_examples=40, margin_steps=40, certify_examples=30, certify_n=200,
                          masking_examples=40, gallery_examples=4)


def _measure(model, digits, threat):
    x, y = digits.test.x[:N_TEST], digits.test.y[:N_TEST]
    attacks = [FGSM(threat), PGD(threat, steps=10, seed=0)]
    report = evaluate(model, x, y, attacks, threat, eps_grid=[0.05, 0.1, 0.2], num_classes=10)
    analysis = analyse(model, x, y, threat, attack=attacks[1], report=report, num_classes=10,
                       options=OPTIONS)
    privacy = audit_trained_model(model, digits, n_examples=100, inversion=False)
    return {"robustness": report.to_dict(), "analysis": analysis.to_dict(), "privacy": privacy.to_dict(),
            "training": {"history": [{}], "best_epoch": 1, "selection_metric": "val_clean_accuracy",
                         "stopped_early": False, "seconds": 1.5}}


@pytest.fixture(scope="session")
def run_results(digits, standard_model, robust_model) -> dict:
    """A results.json payload as ``fortify run`` writes it, from the session's two models."""
    torch.manual_seed(0)
    threat = ThreatModel("linf", 0.2)
    models = {"standard": _measure(standard_model, digits, threat),
              "pgd": _measure(robust_model, digits, threat)}
    return {"version": RESULTS_VERSION, "kind": "comparison", "config": {"data": {"name": "digits"}},
            "dataset": {"name": "digits"}, "threat": {"norm": "linf", "eps": 0.2, "bounds": [0.0, 1.0]},
            "models": models, "seconds": 1.0,
            "provenance": {"fortify_version": "test", "seed": 0, "git_commit": None}}


@pytest.fixture
def run_dir(tmp_path: Path, run_results: dict) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(run_results))
    return directory
