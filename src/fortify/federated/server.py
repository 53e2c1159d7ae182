"""The Flower ServerApp: a Flower strategy, and the global model evaluated centrally each round.

Aggregation is Flower's own: FedAvg, FedProx, Krum, FedTrimmedAvg and FedMedian. After every round
(and before the first) the server measures the global model's clean accuracy and its accuracy
under PGD on the held-out test split, so robustness is tracked per round. With
``federation.out`` set it writes a fortify model directory (``fortify evaluate`` and ``fortify
audit`` read it) plus ``federated.json`` with the per-round record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy
from torch import nn

from fortify.attacks import PGD
from fortify.data import Dataset
from fortify.errors import ConfigError, FortifyError
from fortify.federated.client import DP_EPSILON_KEY, METRICS_KEY, load_run_dataset, new_global_model
from fortify.federated.config import FederatedRun
from fortify.federated.partition import check_client_count
from fortify.federated.results import FederatedResult, RoundRecord, write_run_directory
from fortify.models import MODELS
from fortify.threat import ThreatModel
from fortify.training.objectives import OBJECTIVES

REPLY_TIMEOUT_S = 3600.0


class FederationError(FortifyError):
    """A federated round could not complete (a client failed, too few clients answered)."""


def validate_run(run: FederatedRun) -> Dataset:
    """Check every name and count of ``run`` against its dataset before any client starts."""
    OBJECTIVES.get(run.config.train.objective)
    dataset = load_run_dataset(run)
    MODELS.get(run.config.model.name or dataset.default_model)
    fed = run.federation
    check_client_count(fed.clients, len(dataset.train))
    if fed.malicious_clients >= fed.clients:
        raise ConfigError(f"malicious_clients must be below the number of clients ({fed.clients}), "
                          f"got {fed.malicious_clients}")
    ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds).check_inputs(
        dataset.test.x[:1])
    return dataset


# -- strategies -------------------------------------------------------------------------------

class _FailOnClientError:
    """Stops the run with the clients' own error messages instead of aggregating without them.

    Flower logs a failed reply and carries on with the others; here a client that fails (bad
    settings, a crash) ends the run, so a mistake cannot hide behind the remaining clients.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason.strip()}"
                                for m in failed)
            raise FederationError(f"round {server_round}: {len(failed)} of {len(replies)} clients "
                                  f"failed: {reasons}")
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        # privacy is the worst client's, not a weighted mean of the clients'
        spent = [float(m.content[METRICS_KEY][DP_EPSILON_KEY]) for m in replies
                 if DP_EPSILON_KEY in m.content[METRICS_KEY]]
        if spent and metrics is not None:
            metrics[DP_EPSILON_KEY + "-max"] = max(spent)
        return arrays, metrics


class StrictFedAvg(_FailOnClientError, FedAvg):
    pass


class StrictFedProx(_FailOnClientError, FedProx):
    pass


class StrictKrum(_FailOnClientError, Krum):
    pass


class StrictFedTrimmedAvg(_FailOnClientError, FedTrimmedAvg):
    pass


class StrictFedMedian(_FailOnClientError, FedMedian):
    pass


def build_strategy(run: FederatedRun) -> Strategy:
    """The Flower strategy named by ``federation.strategy``; every client trains every round."""
    fed = run.federation
    # all nodes train each round; evaluation is central, so no client-side evaluation rounds
    common: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 0.0,
                              "min_train_nodes": fed.clients, "min_available_nodes": fed.clients}
    if fed.strategy == "fedprox":
        return StrictFedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy == "krum":
        return StrictKrum(**common, num_malicious_nodes=fed.malicious_clients)
    if fed.strategy == "trimmed-mean":
        return StrictFedTrimmedAvg(**common, beta=fed.trim_beta)
    if fed.strategy == "median":
        return StrictFedMedian(**common)
    return StrictFedAvg(**common)


# -- central evaluation -----------------------------------------------------------------------

def central_evaluator(run: FederatedRun, dataset: Dataset, model: nn.Module, record: list[RoundRecord]
                      ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's ``evaluate_fn``: clean and PGD accuracy of the global model on the test split."""
    fed = run.federation
    test = dataset.test.head(fed.eval_examples)
    threat = ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds)
    attack = PGD(threat, steps=fed.eval_steps, early_stop=True, seed=run.config.eval.seed)
    started = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            clean = (model(test.x).argmax(1) == test.y).float().mean().item()
            x_adv = attack(model, test.x, test.y)
            robust = (model(x_adv).argmax(1) == test.y).float().mean().item()
        record.append(RoundRecord(server_round, clean, robust, time.perf_counter() - started))
        return MetricRecord({"clean-accuracy": clean, "robust-accuracy": robust})

    return evaluate


# -- the app ----------------------------------------------------------------------------------

def run_server(grid: Grid, run: FederatedRun) -> FederatedResult:
    """Run every round of ``run`` over ``grid``; write the run directory when ``out`` is set."""
    torch.set_num_threads(1)
    dataset = validate_run(run)
    model = new_global_model(run, dataset)
    rounds: list[RoundRecord] = []
    strategy = build_strategy(run)
    started = time.perf_counter()
    outcome = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                             num_rounds=run.federation.rounds, timeout=REPLY_TIMEOUT_S,
                             train_config=ConfigRecord(),
                             evaluate_fn=central_evaluator(run, dataset, model, rounds))
    train_metrics = {r: dict(m) for r, m in outcome.train_metrics_clientapp.items()}
    result = FederatedResult.build(run, dataset, rounds, train_metrics, time.perf_counter() - started)
    model.load_state_dict(outcome.arrays.to_torch_state_dict())
    if run.federation.out:
        write_run_directory(Path(run.federation.out), run, dataset, model, result)
    return result


def make_server_app(run: FederatedRun | None = None,
                    on_result: Callable[[FederatedResult], None] | None = None) -> ServerApp:
    """A ServerApp for ``run``; without one it reads the run from Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        this_run = run or FederatedRun.from_run_config(dict(context.run_config))
        result = run_server(grid, this_run)
        if on_result is not None:
            on_result(result)

    return app
