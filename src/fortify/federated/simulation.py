"""Flower's simulation runtime on one machine: each client a virtual SuperNode on Ray.

``run_simulation`` hands the ClientApp and ServerApp of ``run`` to
``flwr.simulation.run_simulation``; Ray runs the clients, at most ``workers`` at a time with one
CPU (and one thread) each.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from fortify.errors import ConfigError, MissingDependencyError
from fortify.federated.client import make_client_app
from fortify.federated.config import FederatedRun
from fortify.federated.results import FederatedResult
from fortify.federated.server import make_server_app, validate_run


class _ClientTracebacks(logging.Filter):
    """Drops the traceback Flower logs for each failed client message: the reply carries the
    client's error, and the run ends with every client's message on one line (server.py)."""

    SOURCES = frozenset({("vce_api", "worker"), ("raybackend", "process_message")})

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.module, record.funcName) not in self.SOURCES


def backend_config(clients: int, workers: int | None) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    workers = min(clients, workers or cpus)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": logging.ERROR, "log_to_driver": False}}


def run_simulation(run: FederatedRun, *, workers: int | None = None, verbose: bool = False
                   ) -> FederatedResult:
    """Run every round of ``run`` in Flower's simulation runtime; returns the per-round record."""
    try:
        from flwr.simulation import run_simulation as flower_run_simulation
    except ImportError as err:
        raise MissingDependencyError("federated simulation needs Flower with Ray: pip install "
                                     "'fortify[federated]'") from err
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    validate_run(run)  # fail here, before Ray starts, on anything a client would refuse
    outcome: list[FederatedResult] = []
    # Ray's workers inherit the environment: one thread per client keeps them off each other's cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: leave them be
    flower_logger = logging.getLogger("flwr")
    quiet = _ClientTracebacks()
    if not verbose:  # Flower logs every round and warns that run_simulation is deprecated
        flower_logger.setLevel(logging.ERROR)
        flower_logger.addFilter(quiet)
    stop = threading.Event()  # set when the runtime returns, normally or on Ctrl-C (StoppableGrid)
    try:
        flower_run_simulation(server_app=make_server_app(run, on_result=outcome.append, stop=stop),
                              client_app=make_client_app(run), num_supernodes=run.federation.clients,
                              backend_config=backend_config(run.federation.clients, workers),
                              verbose_logging=verbose)
    finally:
        stop.set()
        flower_logger.removeFilter(quiet)
    if not outcome:
        raise ConfigError("the simulation ended without a result; rerun with verbose logging")
    return outcome[0]
