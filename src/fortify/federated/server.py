"""The Flower ServerApp: a Flower strategy, and the global model evaluated centrally each round.

Aggregation is Flower's own: FedAvg, FedProx, Krum, FedTrimmedAvg and FedMedian, its result brought
back to the model's dtypes (an integer buffer rounded to the nearest integer). After every round
(and before the first) the server measures the global model's clean accuracy and its accuracy
under PGD on the held-out test split, in batches of ``eval.batch_size``, so robustness is tracked
per round. With ``federation.out`` set it writes a fortify model directory (``fortify evaluate``
and ``fortify audit`` read it) plus ``federated.json`` with the per-round record.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Result, Strategy
from torch import Tensor, nn

from fortify.attacks import PGD, Attack
from fortify.data import Dataset, Split
from fortify.errors import ConfigError, FortifyError
from fortify.federated.client import (
    ARRAYS_KEY,
    DP_EPSILON_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    WEIGHT_KEY,
    check_local_training,
    load_run_dataset,
    new_global_model,
)
from fortify.federated.config import FederatedRun, FederationConfig
from fortify.federated.partition import check_client_count, shard_indices
from fortify.federated.progress import ROUND_OFFSET_KEY, ROUNDS_CUT_OFF_KEY, FederationProgress
from fortify.federated.results import FederatedResult, write_run_directory
from fortify.models import MODELS
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import predicted_class
from fortify.threat import ThreatModel
from fortify.training.objectives import OBJECTIVES

REPLY_TIMEOUT_S = 3600.0
# Flower aggregates in float64, which holds every integer up to 2**53 exactly and no larger one
# reliably: an integer array beyond it could not be brought back to its dtype exactly
LARGEST_EXACT_INTEGER = 2**53


class FederationError(FortifyError):
    """A federated round could not complete (a client failed, too few clients answered)."""


def validate_run(run: FederatedRun) -> Dataset:
    """Check ``run`` against its dataset before any client starts: what a client would find wrong
    inside Ray (or a SuperNode) is one clear error here instead of one traceback per client."""
    OBJECTIVES.get(run.config.train.objective)
    dataset = load_run_dataset(run)
    MODELS.get(run.config.model.name or dataset.default_model)
    fed = run.federation
    check_client_count(fed.clients, len(dataset.train))
    if fed.malicious_clients >= fed.clients:
        raise ConfigError(f"malicious_clients must be below the number of clients ({fed.clients}), "
                          f"got {fed.malicious_clients}")
    check_strategy(fed)
    _check_settings_clients_use(run)
    ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds).check_inputs(
        dataset.test.x[:1])
    # an infeasible Dirichlet draw fails here once rather than on every client
    check_local_training(run, dataset, max(shard_sizes(run, dataset)))
    return dataset


def shard_sizes(run: FederatedRun, dataset: Dataset) -> list[int]:
    """The training examples of each partition's shard: every client computes the same partition
    (deterministic in partition_seed), so the server knows them; labels only, so nothing is copied."""
    fed = run.federation
    return [len(s) for s in shard_indices(dataset.train.y, fed.clients, scheme=fed.partition, alpha=fed.alpha,
                                          seed=fed.partition_seed)]


def _check_settings_clients_use(run: FederatedRun) -> None:
    """Settings of ``fortify train`` that a federated client has no use for would be dropped without a
    word, and those a client's Trainer counts from its first step would restart every round: either
    way the run would not be what its config says."""
    data, train = run.config.data, run.config.train
    # a client builds a new Trainer every round, so what a Trainer counts from its first step would
    # start over each round: a warm-up never ends, an EMA restarts at the global weights and sends
    # back an update shrunk towards them
    restarting = "a client's Trainer starts afresh every round, so this would restart every round"
    dp = run.config.dp
    unused = [(f"dp.canaries={dp.canaries}", "a client has no canary audit") if dp.canaries else None,
              # with the seed in the config the server hands out, it could replay a client's noise
              # and Poisson batches and subtract them: the update would not be private from it
              (f"dp.noise_seed={dp.noise_seed}", "the server could replay each client's noise from it")
              if dp.enabled and dp.noise_seed is not None else None,
              (f"train.extra_data={train.extra_data}", "clients train on their own shard only")
              if train.extra_data is not None else None,
              (f"train.ema_decay={train.ema_decay}", restarting) if train.ema_decay is not None else None,
              (f"train.eps_warmup_epochs={train.eps_warmup_epochs}", restarting)
              if train.eps_warmup_epochs else None,
              (f"train.awp_warmup_epochs={train.awp_warmup_epochs}", restarting)
              if train.awp_warmup_epochs else None,
              (f"data.feature_schema={data.feature_schema}", "clients and the server attack without "
               "tabular constraints") if data.feature_schema is not None else None,
              (f"data.target={data.target}", "csv tables are not federated") if data.target is not None
              else None]
    given = [f"{setting} ({why})" for setting, why in filter(None, unused)]
    if given:
        raise ConfigError(f"federated training does not use {'; '.join(given)}: remove it from the config")


def check_strategy(fed: FederationConfig) -> None:
    """Refuse aggregation settings under which Flower's strategy would silently not do its job."""
    n, f = fed.clients, fed.malicious_clients
    if fed.strategy == "krum" and n < 2 * f + 3:
        # Blanchard et al. 2017 need n > 2f + 2; below that Flower's Krum scores each update by
        # max(1, n - f - 2) neighbours and picks one without any Byzantine guarantee
        most = (f"with {n} clients use at most {(n - 3) // 2} malicious clients" if n >= 3
                else "krum needs at least 3 clients")
        raise ConfigError(f"krum with {f} malicious clients needs at least {2 * f + 3} clients "
                          f"(n >= 2f + 3), got {n}; {most}")
    beta = fed.trim_beta
    if fed.strategy == "trimmed-mean" and beta > 0 and int(beta * n) == 0:
        # Flower trims int(beta * n) updates at each end: none trimmed is an unweighted mean, no defence
        least = math.ceil(1 / beta)
        if int(beta * least) == 0:  # 1 / beta rounded up can still fall short in floating point
            least += 1
        other = f" or --trim-beta (federation.trim_beta) >= {math.ceil(1000 / n) / 1000:g}, below 0.5" \
            if n >= 3 else ""
        raise ConfigError(f"trimmed-mean with trim_beta={beta:g} trims int({beta:g} * {n}) = 0 of {n} "
                          f"clients at each end, which is an unweighted mean; use at least {least} "
                          f"clients{other}")


# -- strategies -------------------------------------------------------------------------------

class _StrictRounds:
    """Aggregates a round only when every client sent a well-formed update.

    Flower logs a failed reply and carries on with the others, drops a client that never replies,
    and aggregates whatever arrays and weights a reply holds. Here the run stops instead, naming the
    nodes: a client that fails (bad settings, a crash) or stays silent, an update whose arrays are not
    the global model's (other keys, shapes or dtypes, NaN or infinite values: one NaN turns even the
    median into NaN), a ``num-examples`` weight other than its shard's size, and partitions that the
    replies do not cover exactly once. The aggregate comes back in the model's dtypes
    (``in_model_dtypes``). ``on_started`` hears of each round before its train messages go out and
    the aggregated metrics go to ``on_aggregated`` (both the run's progress); ``round_offset`` is the
    number of rounds a resumed run finished before, so messages name the run's own round numbers.
    """

    on_started: Callable[[int], None] | None = None
    on_aggregated: Callable[[int, dict[str, Any]], None] | None = None
    round_offset: int = 0
    shard_sizes: list[int]  # training examples in each partition's shard, by partition id

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        # the keys, shapes and dtypes every reply must have and every aggregate is brought back to
        self._model_arrays = initial_arrays
        return super().start(grid, initial_arrays, *args, **kwargs)  # type: ignore[misc]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sent_to = [m.metadata.dst_node_id for m in messages]  # every one of them must reply
        if self.on_started is not None:
            self.on_started(server_round)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        this_round = f"round {server_round + self.round_offset}"
        failed = [m for m in replies if m.has_error()]
        if failed:
            raise FederationError(f"{this_round}: {len(failed)} of {len(replies)} clients failed: "
                                  f"{_failure_summary(failed)}")
        _check_replies(this_round, replies, self._sent_to, self._model_arrays, self.shard_sizes)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            arrays = in_model_dtypes(arrays, self._model_arrays)
        if metrics is not None:
            metrics.pop(PARTITION_KEY, None)  # Flower averaged the partition ids: a number that means nothing
            # privacy is the worst client's; Flower's mean weighted by shard size would understate it,
            # so it is dropped rather than recorded next to the maximum
            metrics.pop(DP_EPSILON_KEY, None)
            spent = [float(m.content[METRICS_KEY][DP_EPSILON_KEY]) for m in replies
                     if DP_EPSILON_KEY in m.content[METRICS_KEY]]
            if spent:
                metrics[DP_EPSILON_KEY + "-max"] = max(spent)
            if self.on_aggregated is not None:
                self.on_aggregated(server_round, dict(metrics))
        return arrays, metrics


def in_model_dtypes(aggregate: ArrayRecord, model_arrays: ArrayRecord) -> ArrayRecord:
    """The aggregate with each array in the global model's dtype, an integer one rounded to nearest.

    Flower's strategies compute every array in floating point: FedAvg's weighted mean, the median,
    the trimmed mean and Krum's mean of the update it selects all turn BatchNorm's int64
    ``num_batches_tracked`` into float64, which torch's ``load_state_dict`` would truncate on the
    clients and in the server's model (a mean count of 11.75 would become 11).

    The strategy's own aggregate, rounded, is the count that goes with the aggregated statistics.
    BatchNorm reads the count only with ``momentum=None``: a cumulative average that weighs the next
    batch by ``1 / (num_batches_tracked + 1)``. A client's count is the global count plus its local
    steps, and its running statistics are the average over those batches; the strategy combines the
    clients' statistics as it combines their counts (the same weights, the same median), so the
    aggregated statistics are an average over the global count plus the clients' combined steps:
    the aggregated count. The sum of the clients' counts would add every client's steps in each
    round while the statistics moved by one combined client's, so later batches would weigh too
    little; the largest count would claim the steps of the client that took the most; truncating
    would drop up to a step every round.
    """
    arrays = ArrayRecord()
    for key, expected in model_arrays.items():
        dtype = np.dtype(expected.dtype)
        values = aggregate[key].numpy()
        if dtype.kind in "biu":  # bool, signed and unsigned integers
            values = np.rint(values)
        arrays[key] = Array(np.asarray(values.astype(dtype, copy=False)))
    return arrays


def _check_replies(this_round: str, replies: list[Message], sent_to: list[int], model_arrays: ArrayRecord,
                  shard_sizes: list[int]) -> None:
    """FederationError unless every node sent to replied, each reply holds arrays of the model's
    keys, shapes and dtypes, all finite, with its shard's size as weight, and the replies cover each
    partition exactly once."""
    replied = {m.metadata.src_node_id for m in replies}
    silent = sorted(set(sent_to) - replied)
    if silent:
        raise FederationError(f"{this_round}: {_nodes(silent)} sent no reply ({len(replied)} of "
                              f"{len(sent_to)} clients replied); a round aggregates every client's update")
    ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
    problems = [f"node {m.metadata.src_node_id} {problem}" for m in ordered
                if (problem := _reply_problem(m.content, model_arrays, shard_sizes)) is not None]
    if problems:
        updates = "an update" if len(problems) == 1 else f"{len(problems)} updates"
        raise FederationError(f"{this_round}: refused {updates}: {'; '.join(problems)}")
    _check_partitions_covered(this_round, ordered, len(shard_sizes))


def _reply_problem(content: RecordDict, model_arrays: ArrayRecord, shard_sizes: list[int]) -> str | None:
    """What is wrong with one client's reply, or None."""
    if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {METRICS_KEY}:
        return (f"sent records {sorted(content)}, not one ArrayRecord {ARRAYS_KEY!r} and one MetricRecord "
                f"{METRICS_KEY!r}")
    return (_metrics_problem(content.metric_records[METRICS_KEY], shard_sizes)
            or _arrays_problem(content.array_records[ARRAYS_KEY], model_arrays))


def _metrics_problem(metrics: MetricRecord, shard_sizes: list[int]) -> str | None:
    # the FedAvg weight: a client claiming more examples than it holds would outweigh the others
    partition, examples = metrics.get(PARTITION_KEY), metrics.get(WEIGHT_KEY)
    if not _is_whole(partition) or not 0 <= partition < len(shard_sizes):
        return f"reports {PARTITION_KEY}={partition!r}, not a whole number from 0 to {len(shard_sizes) - 1}"
    size = shard_sizes[partition]
    if not _is_whole(examples) or examples != size:
        return (f"reports {WEIGHT_KEY}={examples!r}, not {size} (the examples in partition "
                f"{partition}'s shard)")
    return None


def _is_whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _arrays_problem(arrays: ArrayRecord, model_arrays: ArrayRecord) -> str | None:
    keys = model_arrays.keys()
    missing, unknown = sorted(keys - arrays.keys()), sorted(arrays.keys() - keys)
    if missing or unknown:
        return f"sent arrays missing {missing} and unknown {unknown}, not the global model's keys"
    for key, expected in model_arrays.items():
        array = arrays[key]
        if (array.shape, array.dtype) != (expected.shape, expected.dtype):
            return (f"sent {key} as {array.dtype} {list(array.shape)}, not the global model's "
                    f"{expected.dtype} {list(expected.shape)}")
        values = array.numpy()
        if not np.isfinite(values).all():
            return f"sent {key} with NaN or infinite values"
        if values.dtype.kind in "iu" and (np.abs(values) > LARGEST_EXACT_INTEGER).any():
            return (f"sent {key} with integers beyond 2**53, which the aggregation in float64 "
                    "cannot hold exactly")
    return None


def _check_partitions_covered(this_round: str, replies: list[Message], clients: int) -> None:
    """Each partition trained by exactly one node: two nodes started with the same partition-id
    would count one shard twice and leave another out of the model."""
    nodes_of: dict[int, list[int]] = {p: [] for p in range(clients)}
    for message in replies:
        partition = cast(int, message.content.metric_records[METRICS_KEY][PARTITION_KEY])  # checked
        nodes_of[partition].append(message.metadata.src_node_id)
    wrong = [f"partition {p} was trained by {_nodes(nodes) if nodes else 'no node'}"
             for p, nodes in nodes_of.items() if len(nodes) != 1]
    if wrong:
        raise FederationError(f"{this_round}: {', '.join(wrong)}; each partition needs exactly one node: "
                              f"start each SuperNode with its own --node-config 'partition-id=I "
                              f"num-partitions={clients}', I from 0 to {clients - 1}")


def _nodes(ids: list[int]) -> str:
    return f"{'nodes' if len(ids) > 1 else 'node'} {', '.join(map(str, ids))}"


def _failure_summary(failed: list[Message]) -> str:
    """Each distinct client error once, with the nodes that raised it: one line however many fail."""
    nodes: dict[str, list[int]] = {}
    for message in failed:
        reason = one_line_reason(message.error.reason or "")
        nodes.setdefault(reason, []).append(message.metadata.src_node_id)
    # Flower samples the nodes of a round in random order: sorted, the same failure reads the same
    return "; ".join(f"{reason} ({_nodes(sorted(ids))})" for reason, ids in sorted(nodes.items()))


_FLOWER_REASON = re.compile(r"<class '([^']+)'>:<'(.*)'>", re.DOTALL)
_RAY_MESSAGE = "occurred. Message:"


def one_line_reason(reason: str) -> str:
    """A client's error as one line of its own message.

    Flower writes a reason as ``<class 'T'>:<'message'>``; on Ray the message is the worker's whole
    traceback, ending in ``... occurred. Message: <the client's message>``.
    """
    name, text = "", reason.strip()
    match = _FLOWER_REASON.fullmatch(text)
    if match:
        name, text = match.group(1).rsplit(".", 1)[-1], match.group(2)
    if _RAY_MESSAGE in text:  # the type Ray reports is its wrapper's, not the client's
        name, text = "", text.rsplit(_RAY_MESSAGE, 1)[1]
    text = " ".join(text.split())
    return f"{name}: {text}" if name else text


class StrictFedAvg(_StrictRounds, FedAvg):
    pass


class StrictFedProx(_StrictRounds, FedProx):
    pass


class StrictKrum(_StrictRounds, Krum):
    pass


class StrictFedTrimmedAvg(_StrictRounds, FedTrimmedAvg):
    pass


class StrictFedMedian(_StrictRounds, FedMedian):
    pass


def build_strategy(run: FederatedRun, dataset: Dataset, *,
                   on_started: Callable[[int], None] | None = None,
                   on_aggregated: Callable[[int, dict[str, Any]], None] | None = None,
                   round_offset: int = 0) -> Strategy:
    """The Flower strategy named by ``federation.strategy``; every client trains every round."""
    strategy = _new_strategy(run.federation)
    strategy.on_started, strategy.on_aggregated = on_started, on_aggregated
    strategy.round_offset = round_offset
    strategy.shard_sizes = shard_sizes(run, dataset)
    return strategy


def _new_strategy(fed: FederationConfig) -> _StrictRounds:
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

def central_evaluator(run: FederatedRun, dataset: Dataset, model: nn.Module, progress: FederationProgress
                      ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's ``evaluate_fn``: clean and PGD accuracy of the global model on the test split,
    recorded (and saved) as the round's progress."""
    fed = run.federation
    test = dataset.test.head(fed.eval_examples)
    threat = ThreatModel(run.config.threat.norm, run.config.threat.eps, dataset.bounds)
    attack = PGD(threat, steps=fed.eval_steps, early_stop=True, probe=True, seed=run.config.eval.seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if not (server_round == 0 and progress.rounds):  # a resumed run starts from a measured round
            model.load_state_dict(arrays.to_torch_state_dict())
            clean, robust = clean_and_robust_accuracy(model, attack, test, run.config.eval.batch_size)
            progress.finish_round(server_round, clean, robust, model)
        last = progress.rounds[-1]
        return MetricRecord({"clean-accuracy": last.clean_accuracy, "robust-accuracy": last.robust_accuracy})

    return evaluate


def clean_and_robust_accuracy(model: nn.Module, attack: Attack, data: Split, batch_size: int
                              ) -> tuple[float, float]:
    """Accuracy of ``model`` on ``data`` and on ``attack``'s points for it, ``batch_size`` examples
    at a time, so memory does not grow with the test split; in eval mode (BatchNorm on its running
    statistics), the caller's modes restored afterwards.

    One generator, seeded with the attack's seed, is carried from batch to batch: on the CPU an
    L-inf random start then draws the numbers one batch of the whole split would, and the accuracies
    are exactly the one-batch ones (an L2 start draws directions and radii in turn, so its points
    depend on the batch size).
    """
    generator = torch.Generator(device=data.x.device).manual_seed(attack.seed)
    clean = torch.zeros((), dtype=torch.long, device=data.x.device)
    robust = torch.zeros_like(clean)
    with evaluation_mode(model):
        for x, y in data.batches(batch_size):
            with torch.no_grad():
                clean += (predicted_class(model(x)) == y).sum()
            x_adv = attack(model, x, y, generator=generator)
            with torch.no_grad():
                robust += (predicted_class(model(x_adv)) == y).sum()
    return _share(clean, len(data)), _share(robust, len(data))


def _share(correct: Tensor, total: int) -> float:
    return float(correct.float() / total)  # in float32: the value a mean over one batch gives


# -- the app ----------------------------------------------------------------------------------

def run_server(grid: Grid, run: FederatedRun) -> FederatedResult:
    """Run the rounds of ``run`` not yet finished over ``grid``; write the run directory when ``out``
    is set (with ``federation.resume``, from the progress saved there)."""
    torch.set_num_threads(1)
    dataset = validate_run(run)
    model = new_global_model(run, dataset)
    progress = FederationProgress.begin(run, model)
    if progress.rounds_left > 0:
        strategy = build_strategy(run, dataset, on_started=progress.start_round,
                                  on_aggregated=progress.add_train_metrics, round_offset=progress.offset)
        train_config = ConfigRecord({ROUND_OFFSET_KEY: progress.offset, ROUNDS_CUT_OFF_KEY: progress.cut_off})
        outcome = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                 num_rounds=progress.rounds_left, timeout=REPLY_TIMEOUT_S,
                                 train_config=train_config,
                                 evaluate_fn=central_evaluator(run, dataset, model, progress))
        model.load_state_dict(outcome.arrays.to_torch_state_dict())
    result = FederatedResult.build(run, dataset, progress.rounds, progress.train_metrics, progress.seconds,
                                   progress.cut_off)
    if run.federation.out:
        write_run_directory(Path(run.federation.out), run, dataset, model, result)
    return result


class StoppableGrid(Grid):
    """A Grid whose ``send_and_receive`` gives up once ``stop`` is set.

    Flower's simulation runs the ServerApp in a thread of its own; after a Ctrl-C the runtime and its
    clients end, but that thread would go on waiting for their replies (REPLY_TIMEOUT_S) and keep
    the process alive. Everything but the wait is the wrapped grid's.
    """

    POLL_S = 0.1

    def __init__(self, inner: Grid, stop: threading.Event) -> None:
        self.inner, self.stop = inner, stop

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            if self.stop.is_set():
                raise FederationError("the federation was stopped before every client replied")
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if waiting:
                time.sleep(self.POLL_S)
        return replies


def make_server_app(run: FederatedRun | None = None,
                    on_result: Callable[[FederatedResult], None] | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp for ``run``; without one it reads the run from Flower's run config. With ``stop``
    it stops waiting for clients once the event is set (StoppableGrid)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        this_run = run or FederatedRun.from_run_config(dict(context.run_config))
        result = run_server(grid if stop is None else StoppableGrid(grid, stop), this_run)
        if on_result is not None:
            on_result(result)

    return app
