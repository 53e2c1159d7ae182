"""Federated adversarial training on Flower: partitions, ClientApp, ServerApp, simulation and
deployment. Importing this package needs Flower (``pip install 'fortify[federated]'``)."""

from fortify.federated.client import LocalResult, LocalTraining, make_client_app, train_locally
from fortify.federated.config import FederatedRun, FederationConfig, load_federated_run
from fortify.federated.partition import dirichlet_partition, iid_partition
from fortify.federated.results import FederatedResult, RoundRecord
from fortify.federated.server import FederationError, build_strategy, make_server_app

__all__ = ["FederatedResult", "FederatedRun", "FederationConfig", "FederationError", "LocalResult",
           "LocalTraining", "RoundRecord", "build_strategy", "dirichlet_partition", "iid_partition",
           "load_federated_run", "make_client_app", "make_server_app", "train_locally"]
