"""The ServerApp's loop with Flower's strategies, clients served in-process (see InProcessGrid)."""

from __future__ import annotations

import pytest
import torch
from fedkit import InProcessGrid, small_run
from flwr.supercore.task_identity import TaskIdentity

from fortify.errors import ConfigError
from fortify.federated.client import make_client_app
from fortify.federated.config import FederatedRun
from fortify.federated.results import read_result
from fortify.federated.server import FederationError, run_server, validate_run
from fortify.pipeline import load_trained_model


def _run(run: FederatedRun):
    return run_server(InProcessGrid(make_client_app(run), run.federation.clients), run)


def test_the_global_model_improves_and_the_run_directory_loads(task_identity, tmp_path):
    run = small_run(clients=2, rounds=2, local_epochs=2, out=str(tmp_path / "fed"))
    result = _run(run)
    assert [r.round for r in result.rounds] == [0, 1, 2]  # initial model, then every round
    assert result.final.clean_accuracy > result.rounds[0].clean_accuracy + 0.3
    assert all(0 <= r.robust_accuracy <= r.clean_accuracy for r in result.rounds)
    assert set(result.train_metrics) == {1, 2}
    assert read_result(tmp_path / "fed") == result
    _, card = load_trained_model(tmp_path / "fed", torch.device("cpu"))
    assert card["name"] == "mlp"


def _final_accuracy(strategy: str, malicious: int = 0, mode: str = "flip", scale: float = 10.0) -> float:
    run = small_run(clients=4, rounds=4, local_epochs=3, strategy=strategy, malicious_clients=malicious,
                    malicious_mode=mode, malicious_scale=scale)
    return _run(run).final.clean_accuracy


@pytest.fixture(scope="module")
def honest_fedavg_accuracy() -> float:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            patch.setattr(TaskIdentity, name, value)
        return _final_accuracy("fedavg")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "scale"), [("flip", 10.0), ("scale", 100.0)])
def test_one_malicious_client_breaks_fedavg_but_not_the_robust_aggregators(
        task_identity, honest_fedavg_accuracy, mode, scale):
    # Prepare: 4 clients, partition 0 sends w_g - 10 * delta (flip) or w_g + 100 * delta (scale)
    honest = honest_fedavg_accuracy
    # Execute
    attacked = _final_accuracy("fedavg", 1, mode, scale)
    defended = {name: _final_accuracy(name, 1, mode, scale) for name in ("median", "krum", "trimmed-mean")}
    # Assert
    assert honest > 0.75
    assert attacked < honest - 0.4
    for name, accuracy in defended.items():
        assert accuracy > honest - 0.2, name


def test_fedprox_sends_its_mu_and_the_clients_use_it(task_identity):
    seen: list[float] = []

    def recording_trainer(model, data, settings):
        seen.append(settings.proximal_mu)
        from fortify.federated.client import train_locally

        return train_locally(model, data, settings)

    run = small_run(clients=2, rounds=1, strategy="fedprox", proximal_mu=0.5)
    run_server(InProcessGrid(make_client_app(run, local_trainer=recording_trainer), 2), run)
    assert seen == [0.5, 0.5]


def test_a_failing_client_stops_the_run_with_its_message(task_identity):
    def broken_trainer(model, data, settings):
        raise ConfigError("local data is corrupt")

    run = small_run(clients=2, rounds=1)
    with pytest.raises(FederationError, match="round 1: 2 of 2 clients failed: .*local data is corrupt"):
        run_server(InProcessGrid(make_client_app(run, local_trainer=broken_trainer), 2), run)


def test_bad_runs_are_refused_before_any_client_starts():
    with pytest.raises(ConfigError, match="5000 clients"):
        validate_run(small_run(clients=5000))
    with pytest.raises(ConfigError, match="malicious_clients must be below"):
        validate_run(small_run(clients=2, malicious_clients=2))
    with pytest.raises(ConfigError, match="valid names"):
        validate_run(small_run(objective="pgdd"))
    with pytest.raises(ConfigError, match="federation.rounds"):
        small_run(rounds=0)
