"""Fixtures of the federated tests."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids Flower's runtimes give a ServerApp process; messages read them when built."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
