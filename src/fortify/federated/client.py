"""The Flower ClientApp: local training with any fortify objective on the client's own shard.

A client receives the global weights, trains ``federation.local_epochs`` epochs with the run's
objective (standard, pgd, trades, ...) through fortify's Trainer, and sends its weights back with
the number of examples it trained on. FedProx adds ``mu / 2 * ||w - w_global||^2`` to the local
loss. Clients listed as malicious send a poisoned update instead (for robustness experiments).

Local training is pluggable: ``make_client_app(local_trainer=...)`` takes any function with the
signature of ``train_locally``; a differentially private trainer (DP-SGD through Opacus) plugs in
there without changes to the app.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from fortify.config import DPConfig, TrainConfig
from fortify.data import DataOptions, Dataset, Split, load_dataset
from fortify.errors import ConfigError
from fortify.federated.config import FederatedRun
from fortify.federated.partition import partition
from fortify.federated.progress import ROUND_OFFSET_KEY, ROUNDS_CUT_OFF_KEY
from fortify.models import build_model
from fortify.threat import ThreatModel
from fortify.training.methods import objective_from_config
from fortify.training.objectives import DelegatingObjective, Objective
from fortify.training.trainer import Trainer

ARRAYS_KEY = "arrays"  # the record keys Flower's strategies read
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
WEIGHT_KEY = "num-examples"
PARTITION_KEY = "partition-id"  # which shard the client trained on: the server checks each is trained once
DP_EPSILON_KEY = "dp-epsilon"
LOCAL_VAL_EXAMPLES = 128  # the local accuracy a client reports is measured on this many of its own


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training needs."""

    train: TrainConfig
    threat: ThreatModel
    proximal_mu: float = 0.0
    dp: DPConfig | None = None  # client-side DP-SGD (Opacus) when enabled
    server_round: int = 1  # DP composes over the rounds a client has trained in
    rounds_cut_off: int = 0  # and over the rounds an interrupted run may have released updates in

    @property
    def released_rounds(self) -> int:
        """The rounds whose updates count against the client's DP budget, this one included."""
        return self.server_round + self.rounds_cut_off


@dataclass(frozen=True)
class LocalResult:
    train_loss: float
    local_clean_accuracy: float
    local_robust_accuracy: float | None
    dp_epsilon: float | None = None  # privacy spent by this client over all its rounds so far


LocalTrainer = Callable[[nn.Module, Split, LocalTraining], LocalResult]


# -- FedProx ----------------------------------------------------------------------------------

class ProximalObjective(DelegatingObjective):
    """FedProx (Li et al. 2020): the wrapped objective plus ``mu / 2 * ||w - w_global||^2``.

    Everything the Trainer asks of an objective is passed through to the wrapped one.
    """

    def __init__(self, inner: Objective, anchor: list[Tensor], mu: float) -> None:
        super().__init__(inner)
        self.anchor, self.mu = anchor, mu
        self.name, self.adversarial, self.replays = inner.name, inner.adversarial, inner.replays

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.inner(model, x, y) + self.mu / 2 * proximal_term(model, self.anchor)


def proximal_term(model: nn.Module, anchor: list[Tensor]) -> Tensor:
    """``||w - anchor||^2`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True)),
               start=torch.zeros((), device=params[0].device))


# -- local training ---------------------------------------------------------------------------

def build_local_objective(model: nn.Module, settings: LocalTraining) -> Objective:
    objective = objective_from_config(settings.train, settings.threat)
    if settings.proximal_mu > 0:
        anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        objective = ProximalObjective(objective, anchor, settings.proximal_mu)
    return objective


def train_locally(model: nn.Module, data: Split, settings: LocalTraining) -> LocalResult:
    """The default local trainer: fortify's Trainer for ``settings.train.epochs`` epochs.

    With ``settings.dp`` enabled the client trains with DP-SGD, so the update it sends is already
    private: the server (curious or not) only sees clipped, noised gradients' sum.
    """
    trainer = build_local_trainer(model, settings)
    if _private(settings):
        return _train_privately(model, data, settings, trainer)
    history = trainer.fit(data, data.head(LOCAL_VAL_EXAMPLES)).history
    last = history[-1]
    return LocalResult(sum(r.train_loss for r in history) / len(history), last.val_clean_accuracy,
                       last.val_robust_accuracy)


def build_local_trainer(model: nn.Module, settings: LocalTraining) -> Trainer:
    """The Trainer (or DPTrainer) a client trains with; building it checks the settings, so the
    server builds one too before any client starts (``check_local_training``)."""
    objective = build_local_objective(model, settings)
    if not _private(settings):
        return Trainer(model, objective, settings.train, threat=settings.threat, show_progress=False)
    from fortify.training.dp import DPTrainer

    dp = settings.dp
    assert dp is not None
    if dp.noise_multiplier is None:
        raise ConfigError("federated DP needs dp.noise_multiplier (--noise-multiplier): a target epsilon "
                          "per round would not say what the rounds spend together")
    trainer = DPTrainer(model, objective, settings.train, dp=dp, threat=settings.threat, show_progress=False)
    replaced = trainer.replaced_modules
    if replaced:
        more = f" and {len(replaced) - 2} more" if len(replaced) > 2 else ""
        raise ConfigError(f"federated DP needs a model without BatchNorm (Opacus would replace "
                          f"{', '.join(replaced[:2])}{more} on the clients only); choose another model, "
                          "e.g. small-cnn or mlp")
    if isinstance(objective, ProximalObjective):
        add_proximal_gradient_after_privacy(trainer, objective)
    return trainer


def add_proximal_gradient_after_privacy(trainer: Trainer, objective: ProximalObjective) -> None:
    """FedProx under DP-SGD: Opacus replaces each gradient with the clipped, noised sum of the
    per-example gradients its layer hooks saw, and the proximal term flows through no layer, so its
    gradient would be dropped (FedProx silently FedAvg). ``mu * (w - w_global)`` depends on no
    example: added after the noise, by a hook on the optimiser Opacus wraps, it costs no privacy."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def add_proximal_gradient(*_: Any) -> None:
        with torch.no_grad():
            for p, anchor in zip(params, objective.anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=objective.mu)

    trainer.optimizer.register_step_pre_hook(add_proximal_gradient)


def check_local_training(run: FederatedRun, dataset: Dataset, largest_shard: int) -> None:
    """What every client would refuse, refused once: the trainer's own checks (DP objective, amp,
    BatchNorm, noise) and DP's ``delta < 1/n``, which the largest shard bounds most tightly."""
    settings = LocalTraining(local_train_config(run, 1, 0),
                             ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds),
                             dp=run.config.dp)
    build_local_trainer(new_global_model(run, dataset), settings)
    if _private(settings):
        from fortify.training.dp import check_delta

        try:
            check_delta(run.config.dp.delta, largest_shard)
        except ConfigError as err:
            raise ConfigError(f"{err} (the largest of the {run.federation.clients} client shards); "
                              "lower --delta") from None


def _private(settings: LocalTraining) -> bool:
    return settings.dp is not None and settings.dp.enabled


def _train_privately(model: nn.Module, data: Split, settings: LocalTraining, trainer: Trainer
                     ) -> LocalResult:
    from fortify.federated.privacy import composed_epsilon
    from fortify.training.dp import DPTrainResult

    dp = settings.dp
    assert dp is not None
    result = trainer.fit(data, data.head(LOCAL_VAL_EXAMPLES))
    assert isinstance(result, DPTrainResult) and result.privacy is not None
    model.load_state_dict(trainer.model.state_dict())  # DP trained a validated copy
    spent = result.privacy
    epsilon = composed_epsilon(spent.noise_multiplier, spent.sample_rate,
                               spent.steps * settings.released_rounds, dp.delta, dp.accountant)
    last = result.history[-1]
    return LocalResult(sum(r.train_loss for r in result.history) / len(result.history),
                       last.val_clean_accuracy, last.val_robust_accuracy, dp_epsilon=epsilon)


def local_train_config(run: FederatedRun, server_round: int, partition_id: int) -> TrainConfig:
    """The run's TrainConfig for one client round: its own seed, no early stopping, and a
    constant learning rate (a decaying schedule would restart at every round)."""
    # one seed per (round, client): a stride of at least the client count keeps them apart (1000, the
    # stride the measured runs used, while there are no more clients than that)
    stride = max(1000, run.federation.clients)
    seed = run.config.train.seed + stride * server_round + partition_id
    return run.config.train.model_copy(update={
        "epochs": run.federation.local_epochs, "early_stopping": False, "schedule": "constant",
        "seed": seed})


# -- poisoned updates -------------------------------------------------------------------------

def poison(global_state: dict[str, Tensor], local_state: dict[str, Tensor], *, mode: str,
           scale: float) -> dict[str, Tensor]:
    """A malicious client's weights: its update boosted (``scale``) or reversed (``flip``).

    ``scale`` sends ``w_g + s * delta`` (model replacement, Bagdasaryan et al. 2020); ``flip``
    sends ``w_g - s * delta`` (sign flipping), where ``delta = w_local - w_g``.
    """
    if mode not in ("scale", "flip"):
        raise ConfigError(f"unknown malicious mode {mode!r}; valid: flip, scale")
    factor = scale if mode == "scale" else -scale
    return {k: g + factor * (local_state[k] - g) if g.is_floating_point() else local_state[k]
            for k, g in global_state.items()}


# -- data and model on a node -----------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int, val_fraction: float, test_fraction: float, cache_dir: str,
             path: str | None, download: bool) -> Dataset:
    from pathlib import Path

    return load_dataset(name, DataOptions(seed=seed, val_fraction=val_fraction,
                                          test_fraction=test_fraction, cache_dir=Path(cache_dir),
                                          path=Path(path) if path else None, download=download))


def load_run_dataset(run: FederatedRun) -> Dataset:
    data = run.config.data
    return _dataset(data.name, data.seed, data.val_fraction, data.test_fraction, str(data.cache_dir),
                    str(data.path) if data.path else None, data.download)


def client_shard(run: FederatedRun, partition_id: int, num_partitions: int) -> Split:
    """This client's part of the training split (every node computes the same partition)."""
    fed = run.federation
    # the server checked delta and the shards for fed.clients parts: a node that cut the data into
    # another number would train on a shard no one checked, overlapping or missing others
    if num_partitions != fed.clients:
        raise ConfigError(f"this node's num-partitions={num_partitions}, but the run has "
                          f"federation.clients={fed.clients}; start every SuperNode with "
                          f"--node-config 'partition-id=I num-partitions={fed.clients}'")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    shards = partition(load_run_dataset(run).train, num_partitions, scheme=fed.partition,
                       alpha=fed.alpha, seed=fed.partition_seed)
    return shards[partition_id]


def new_global_model(run: FederatedRun, dataset: Dataset) -> nn.Module:
    """The architecture every node builds; the weights come from the server."""
    torch.manual_seed(run.config.train.seed)
    normalize = run.config.model.normalize and dataset.mean is not None
    return build_model(run.config.model.name or dataset.default_model, dataset.input_shape,
                       dataset.num_classes, mean=dataset.mean if normalize else None,
                       std=dataset.std if normalize else None)


def _partition_of(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError("a SuperNode needs --node-config 'partition-id=I num-partitions=N'; got "
                          f"{dict(node)}")
    return int(node["partition-id"]), int(node["num-partitions"])


# -- the app ----------------------------------------------------------------------------------

def client_round(run: FederatedRun, message: Message, partition_id: int, num_partitions: int,
                 local_trainer: LocalTrainer = train_locally) -> RecordDict:
    """One client's reply to a training message: weights plus metrics."""
    dataset = load_run_dataset(run)
    shard = client_shard(run, partition_id, num_partitions)
    model = new_global_model(run, dataset)
    model.load_state_dict(message.content[ARRAYS_KEY].to_torch_state_dict())
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = message.content[CONFIG_KEY]
    # a resumed run's strategy counts from 1 again; the offset keeps seeds and DP composition the run's
    server_round = int(config.get("server-round", 0)) + int(config.get(ROUND_OFFSET_KEY, 0))
    settings = LocalTraining(local_train_config(run, server_round, partition_id),
                             ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds),
                             proximal_mu=float(config.get("proximal-mu", 0.0)), dp=run.config.dp,
                             server_round=max(server_round, 1),
                             rounds_cut_off=int(config.get(ROUNDS_CUT_OFF_KEY, 0)))
    result = local_trainer(model, shard, settings)
    state = model.state_dict()
    fed = run.federation
    if partition_id < fed.malicious_clients:
        state = poison(global_state, state, mode=fed.malicious_mode, scale=fed.malicious_scale)
    metrics = MetricRecord(reply_metrics(result, len(shard), partition_id))
    return RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: metrics})


def reply_metrics(result: LocalResult, n_examples: int, partition_id: int) -> dict[str, Any]:
    """What a client reports beside its weights. Under DP only its partition, its example count and
    the epsilon it spent (the server knows every shard's size anyway): its loss and accuracies are
    exact functions of its private examples, which DP-SGD's noise does not cover (from the loss alone
    a server could tell which of its candidates a client holds)."""
    shard = {PARTITION_KEY: partition_id, WEIGHT_KEY: n_examples}
    if result.dp_epsilon is not None:
        return {**shard, DP_EPSILON_KEY: result.dp_epsilon}
    metrics: dict[str, Any] = {**shard, "train-loss": result.train_loss,
                               "local-clean-accuracy": result.local_clean_accuracy}
    if result.local_robust_accuracy is not None:
        metrics["local-robust-accuracy"] = result.local_robust_accuracy
    return metrics


def make_client_app(run: FederatedRun | None = None, *,
                    local_trainer: LocalTrainer = train_locally) -> ClientApp:
    """A ClientApp for ``run``; without one it reads the run from Flower's run config."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(int(os.environ.get("FORTIFY_CLIENT_THREADS", "1")))
        this_run = run or FederatedRun.from_run_config(dict(context.run_config))
        partition_id, num_partitions = _partition_of(context)
        reply = client_round(this_run, message, partition_id, num_partitions, local_trainer)
        return Message(reply, reply_to=message)

    return app
