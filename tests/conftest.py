"""Shared fixtures: small trained models on the embedded digits data, built once per session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fortify.config import TrainConfig
from fortify.data import Dataset, load_dataset
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.objectives import ObjectiveOptions, build_objective
from fortify.training.trainer import Trainer

# Under pytest-xdist each worker gets one thread: two workers of two threads each on two cores
# oversubscribe the CPU, and small models then run many times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _repeatable_dp_noise(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """DP training seeds its sampling and noise from the OS's entropy (``secrets.randbits``, docs/DP.md),
    so what it reaches differs from run to run. Tests get one fixed draw instead, so that each passes
    or fails the same way every time; a test marked ``os_entropy`` keeps the real source."""
    if request.node.get_closest_marker("os_entropy") is None:
        monkeypatch.setattr("secrets.randbits", lambda bits: 20_240_601 % 2**bits)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


def _train(dataset: Dataset, objective: str, epochs: int, eps: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small-cnn", dataset.input_shape, dataset.num_classes)
    threat = ThreatModel("linf", eps)
    config = TrainConfig(objective=objective, epochs=epochs, early_stopping=False, attack_steps=5)
    trainer = Trainer(model, build_objective(objective, ObjectiveOptions(threat, attack_steps=5)),
                      config, threat=threat, show_progress=False)
    trainer.fit(dataset.train, dataset.val)
    return model.eval()


@pytest.fixture(scope="session")
def standard_model(digits: Dataset) -> nn.Module:
    """A small CNN with about 97% clean test accuracy on digits, not robust."""
    return _train(digits, "standard", epochs=8)


@pytest.fixture(scope="session")
def robust_model(digits: Dataset) -> nn.Module:
    """A small CNN PGD-trained at L-inf eps=0.2 on digits."""
    return _train(digits, "pgd", epochs=10)
