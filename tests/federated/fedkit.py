"""Helpers of the federated tests: small runs and in-process Flower Grids (honest or misbehaving)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from torch import nn

from fortify.federated.config import FederatedRun, load_federated_run
from fortify.models.registry import ModelSpec

BATCHNORM_MLP = "batchnorm-mlp"  # registered by the batchnorm_mlp fixture
BATCHNORM_COUNTER = "2.num_batches_tracked"  # its int64 buffer


def small_batchnorm_mlp(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, spec.num_classes))


def small_run(*, objective: str = "standard", train: dict[str, Any] | None = None, model: str = "mlp",
              dp: dict[str, Any] | None = None, sections: dict[str, Any] | None = None,
              **federation: Any) -> FederatedRun:
    """An MLP on digits; few clients and rounds unless the test says otherwise. ``sections`` sets
    other parts of the RunConfig (``{"eval": {"batch_size": 64}}``)."""
    settings = {"clients": 2, "rounds": 2, "eval_examples": 200, "eval_steps": 5, **federation}
    return load_federated_run(None, {
        "model": {"name": model},
        "train": {"objective": objective, "attack_steps": 3, "lr": 0.05, **(train or {})},
        **({"dp": dp} if dp else {}), **(sections or {})},
        settings)


class InProcessGrid(Grid):
    """Hands every message straight to a ClientApp in this process.

    A test double for Flower's runtimes (Ray simulation, SuperLink): it lets the real strategy
    loop, client code and central evaluation run in milliseconds. The runtimes themselves are
    exercised by the simulation and deployment tests.
    """

    def __init__(self, client_app: ClientApp, clients: int) -> None:
        self.client_app = client_app
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": node - 1, "num-partitions": clients})
                         for node in range(1, clients + 1)}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return [self._deliver(m) for m in messages]

    def _deliver(self, message: Message) -> Message:
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # the runtimes turn a ClientApp's exception into an error reply
            return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)


class TamperingGrid(InProcessGrid):
    """An InProcessGrid whose clients misbehave: ``tamper(node, content)`` may change each reply's
    content in place, as a buggy or malicious client would, and the nodes in ``silent`` never reply
    (a crashed node, a cut network: the runtime gives up waiting and hands over the others)."""

    def __init__(self, client_app: ClientApp, clients: int,
                 tamper: Callable[[int, RecordDict], None] = lambda node, content: None,
                 silent: Iterable[int] = ()) -> None:
        super().__init__(client_app, clients)
        self.tamper, self.silent = tamper, set(silent)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = [self._deliver(m) for m in messages if m.metadata.dst_node_id not in self.silent]
        for reply in replies:
            self.tamper(reply.metadata.src_node_id, reply.content)
        return replies
