"""Fixtures of the federated tests."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from fedkit import BATCHNORM_MLP, small_batchnorm_mlp  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fortify.models import MODELS  # noqa: E402


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids Flower's runtimes give a ServerApp process; messages read them when built."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def batchnorm_mlp(monkeypatch: pytest.MonkeyPatch) -> str:
    """``small_batchnorm_mlp`` in the model registry for the test; its name."""
    monkeypatch.setitem(MODELS._factories, BATCHNORM_MLP, small_batchnorm_mlp)
    return BATCHNORM_MLP
