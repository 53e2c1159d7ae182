"""The ServerApp's loop with Flower's strategies, clients served in-process (see InProcessGrid)."""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import pytest
import torch
from fedkit import BATCHNORM_COUNTER, InProcessGrid, TamperingGrid, small_run
from flwr.app import Array, ArrayRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fortify.errors import ConfigError
from fortify.federated.client import load_run_dataset, make_client_app
from fortify.federated.config import FederatedRun, load_federated_run
from fortify.federated.partition import shard_indices
from fortify.federated.results import read_result
from fortify.federated.server import (
    FederationError,
    StoppableGrid,
    one_line_reason,
    run_server,
    shard_sizes,
    validate_run,
)
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
    assert "partition-id" not in result.train_metrics[1]  # checked by the server, not a training metric
    assert read_result(tmp_path / "fed") == result
    _, card = load_trained_model(tmp_path / "fed", torch.device("cpu"))
    assert card["name"] == "mlp"


def test_an_infinite_epsilon_reads_back_as_infinite(tmp_path):
    # Prepare: a DP run without noise spends an infinite epsilon, which JSON stores as null
    from fortify.federated.results import RESULT_FILE, FederatedResult, RoundRecord
    from fortify.pipeline import write_json

    result = FederatedResult([RoundRecord(0, 0.5, 0.1, 1.0)], {1: {"dp-epsilon-max": math.inf, "loss": 0.5}},
                             {}, {}, "standard", "digits", 2.0)
    write_json(tmp_path / RESULT_FILE, result.to_dict())
    # Execute / Assert
    assert read_result(tmp_path).train_metrics == {1: {"dp-epsilon-max": math.inf, "loss": 0.5}}


def test_the_rounds_table_says_when_rounds_cut_off_count_in_the_epsilon(tmp_path):
    from rich.console import Console

    from fortify.federated.command import print_rounds
    from fortify.federated.results import RESULT_FILE, FederatedResult, RoundRecord
    from fortify.pipeline import write_json

    threat = {"n_examples": 10, "steps": 5, "norm": "linf", "eps": 0.1}
    result = FederatedResult([RoundRecord(0, 0.5, 0.1, 1.0), RoundRecord(1, 0.6, 0.2, 2.0)],
                             {1: {"dp-epsilon-max": 1.5}}, threat, {"clients": 2, "strategy": "fedavg"},
                             "standard", "digits", 2.0, rounds_cut_off=1)
    console = Console(record=True, width=200)
    print_rounds(result, console)
    assert "1 round(s) cut off by an interruption count in the epsilon" in console.export_text()
    # a record written before the count existed reads back as nothing cut off
    record = result.to_dict()
    del record["rounds_cut_off"]
    write_json(tmp_path / RESULT_FILE, record)
    assert read_result(tmp_path).rounds_cut_off == 0


def _final_accuracy(strategy: str, malicious: int = 0, mode: str = "flip", scale: float = 10.0) -> float:
    # 5 clients: Krum needs n >= 2f + 3 for f = 1
    run = small_run(clients=5, rounds=4, local_epochs=3, strategy=strategy, malicious_clients=malicious,
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
    # Prepare: 5 clients, partition 0 sends w_g - 10 * delta (flip) or w_g + 100 * delta (scale)
    honest = honest_fedavg_accuracy
    # Execute
    attacked = _final_accuracy("fedavg", 1, mode, scale)
    defended = {name: _final_accuracy(name, 1, mode, scale) for name in ("median", "krum", "trimmed-mean")}
    # Assert
    assert honest > 0.75
    assert attacked < honest - 0.4
    for name, accuracy in defended.items():
        assert accuracy > honest - 0.2, name


def test_fedavg_weighs_each_update_by_its_clients_shard_size(task_identity, tmp_path):
    # Prepare: uneven Dirichlet shards; each client sends every weight equal to its shard's size n_k
    from fortify.federated.client import LocalResult

    def constant_trainer(model, data, settings):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(len(data)))
        return LocalResult(train_loss=0.0, local_clean_accuracy=0.0, local_robust_accuracy=None)

    run = small_run(clients=3, rounds=1, partition="dirichlet", alpha=0.5, out=str(tmp_path / "fed"))
    sizes = shard_sizes(run, load_run_dataset(run))
    # Execute
    run_server(InProcessGrid(make_client_app(run, local_trainer=constant_trainer), 3), run)
    # Assert: sum n_k * n_k / sum n_k, which the unweighted mean of the n_k misses by far
    model, _ = load_trained_model(tmp_path / "fed", torch.device("cpu"))
    weighted = sum(n * n for n in sizes) / sum(sizes)
    assert abs(weighted - sum(sizes) / 3) > 10
    for p in model.parameters():
        assert torch.allclose(p, torch.full_like(p, weighted), rtol=1e-6), float(p.flatten()[0])


def test_a_rounds_privacy_is_its_worst_clients_epsilon_and_no_mean_of_them(task_identity, tmp_path):
    # Prepare: uneven shards; each client reports an epsilon equal to its shard's size
    from fortify.federated.client import LocalResult

    def reporting_trainer(model, data, settings):
        return LocalResult(train_loss=0.0, local_clean_accuracy=0.0, local_robust_accuracy=None,
                           dp_epsilon=float(len(data)))

    run = small_run(clients=3, rounds=1, partition="dirichlet", alpha=0.5, out=str(tmp_path / "fed"))
    sizes = shard_sizes(run, load_run_dataset(run))
    # Execute
    result = run_server(InProcessGrid(make_client_app(run, local_trainer=reporting_trainer), 3), run)
    # Assert: the largest; a mean weighted by shard size (what Flower makes of any metric) would
    # understate the privacy spent, so none is recorded
    assert len(set(sizes)) == 3
    assert result.train_metrics[1]["dp-epsilon-max"] == max(sizes)
    assert "dp-epsilon" not in result.train_metrics[1]
    assert "dp-epsilon" not in read_result(tmp_path / "fed").train_metrics[1]


def test_fedprox_sends_its_mu_and_the_clients_use_it(task_identity):
    seen: list[float] = []

    def recording_trainer(model, data, settings):
        seen.append(settings.proximal_mu)
        from fortify.federated.client import train_locally

        return train_locally(model, data, settings)

    run = small_run(clients=2, rounds=1, strategy="fedprox", proximal_mu=0.5)
    run_server(InProcessGrid(make_client_app(run, local_trainer=recording_trainer), 2), run)
    assert seen == [0.5, 0.5]


def _on_node(node, change):
    """A tamper for TamperingGrid: ``change`` applied to the content of ``node``'s reply only."""
    return lambda sender, content: change(content) if sender == node else None


def _replace_array(key, value):
    def change(content):
        content["arrays"][key] = Array(value)
    return change


def _drop_array(key):
    def change(content):
        del content["arrays"][key]
    return change


def _set_metric(key, value):
    def change(content):
        content["metrics"][key] = value
    return change


def _refused(run, grid, message):
    with pytest.raises(FederationError, match=f"^{re.escape(message)}$"):
        run_server(grid, run)


@pytest.mark.parametrize(("strategy", "change", "problem"), [
    # one NaN client made every weight of the median's global model NaN, and the round was recorded
    ("median", _replace_array("3.bias", np.full(128, np.nan, np.float32)),
     "sent 3.bias with NaN or infinite values"),
    ("fedavg", _replace_array("5.bias", np.full(10, np.inf, np.float32)),
     "sent 5.bias with NaN or infinite values"),
    # FedAvg broadcast a (1, 64) row into the (128, 64) weight without a word
    ("fedavg", _replace_array("1.weight", np.full((1, 64), 5.0, np.float32)),
     "sent 1.weight as float32 [1, 64], not the global model's float32 [128, 64]"),
    ("median", _replace_array("1.bias", np.zeros(128, np.float64)),
     "sent 1.bias as float64 [128], not the global model's float32 [128]"),
    ("fedavg", _drop_array("5.bias"),
     "sent arrays missing ['5.bias'] and unknown [], not the global model's keys"),
])
def test_an_update_unlike_the_global_models_arrays_is_refused_naming_the_node(task_identity, strategy, change,
                                                                             problem):
    run = small_run(clients=3, rounds=1, strategy=strategy)
    grid = TamperingGrid(make_client_app(run), 3, _on_node(2, change))
    _refused(run, grid, f"round 1: refused an update: node 2 {problem}")


@pytest.mark.parametrize(("key", "value", "problem"), [
    # FedAvg weighs by num-examples: a zero model claiming 1e9 examples outweighed the honest clients
    ("num-examples", 10**9, "reports num-examples=1000000000, not 419 (the examples in partition 1's shard)"),
    ("num-examples", -419, "reports num-examples=-419, not 419 (the examples in partition 1's shard)"),
    ("num-examples", 0, "reports num-examples=0, not 419 (the examples in partition 1's shard)"),
    ("num-examples", 419.0, "reports num-examples=419.0, not 419 (the examples in partition 1's shard)"),
    ("partition-id", 3, "reports partition-id=3, not a whole number from 0 to 2"),
])
def test_a_weight_other_than_the_clients_shard_size_is_refused(task_identity, key, value, problem):
    run = small_run(clients=3, rounds=1)
    grid = TamperingGrid(make_client_app(run), 3, _on_node(2, _set_metric(key, value)))
    _refused(run, grid, f"round 1: refused an update: node 2 {problem}")


def test_two_nodes_started_with_the_same_partition_id_are_refused(task_identity):
    # Prepare: the same --node-config on both SuperNodes: shard 0 would count twice, shard 1 never
    run = small_run(clients=2, rounds=1)
    grid = InProcessGrid(make_client_app(run), 2)
    for context in grid.contexts.values():
        context.node_config["partition-id"] = 0
    # Execute / Assert
    _refused(run, grid, "round 1: partition 0 was trained by nodes 1, 2, partition 1 was trained by no node; "
                        "each partition needs exactly one node: start each SuperNode with its own "
                        "--node-config 'partition-id=I num-partitions=2', I from 0 to 1")


@pytest.mark.parametrize(("silent", "message"), [
    # Flower aggregated the replies that came and recorded the round as trained
    ({2}, "round 1: node 2 sent no reply (2 of 3 clients replied)"),
    ({1, 2, 3}, "round 1: nodes 1, 2, 3 sent no reply (0 of 3 clients replied)"),
])
def test_a_round_some_clients_did_not_reply_to_is_refused_naming_them(task_identity, silent, message):
    run = small_run(clients=3, rounds=1)
    grid = TamperingGrid(make_client_app(run), 3, silent=silent)
    _refused(run, grid, f"{message}; a round aggregates every client's update")


class RecordingGrid(TamperingGrid):
    """A TamperingGrid that keeps, for each exchange that trains, the arrays the server sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[list[ArrayRecord]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.sent.append([m.content["arrays"].copy() for m in messages])
        return super().send_and_receive(messages, timeout=timeout)


COUNTS = {1: 10, 2: 11, 3: 12, 4: 14}  # node: the num_batches_tracked its BatchNorm reports


@pytest.mark.parametrize(("strategy", "expected"), [
    # shards of 315, 315, 314 and 314 examples: the weighted mean 11.75 was loaded as 11
    ("fedavg", {12}),
    ("fedprox", {12}),
    ("median", {12}),  # 11.5, rounded half to even
    ("trimmed-mean", {12}),  # 10 and 14 trimmed: the mean of 11 and 12
    ("krum", set(COUNTS.values())),  # the count of the update it selects
])
def test_the_global_models_integer_buffer_is_the_rounded_aggregate_in_its_dtype(
        task_identity, batchnorm_mlp, tmp_path, strategy, expected):
    # Prepare: four clients whose BatchNorm counted different numbers of batches
    run = small_run(clients=4, rounds=2, model=batchnorm_mlp, strategy=strategy, out=str(tmp_path))

    def report_count(node, content):
        content["arrays"][BATCHNORM_COUNTER] = Array(np.array(COUNTS[node], np.int64))

    grid = RecordingGrid(make_client_app(run), 4, report_count)
    # Execute
    run_server(grid, run)
    # Assert: round 2's clients all got round 1's count as an int64, and the run's model holds it
    first, second = grid.sent
    assert {arrays[BATCHNORM_COUNTER].dtype for arrays in first} == {"int64"}  # the model's own
    sent = {(arrays[BATCHNORM_COUNTER].dtype, int(arrays[BATCHNORM_COUNTER].numpy())) for arrays in second}
    assert len(sent) == 1
    ((dtype, count),) = sent
    assert count in expected
    assert dtype == "int64"
    saved = load_file(str(tmp_path / "model.safetensors"))[BATCHNORM_COUNTER]
    assert (saved.dtype, int(saved)) == (torch.int64, count)


def test_an_integer_beyond_what_the_float64_aggregation_holds_is_refused(task_identity, batchnorm_mlp):
    # float64 holds every integer only up to 2**53: 2**53 + 1 would come back from Flower as 2**53
    assert float(2**53 + 1) == 2**53
    run = small_run(clients=3, rounds=1, model=batchnorm_mlp)
    grid = TamperingGrid(make_client_app(run), 3,
                         _on_node(2, _replace_array(BATCHNORM_COUNTER, np.array(2**53 + 1, np.int64))))
    _refused(run, grid, f"round 1: refused an update: node 2 sent {BATCHNORM_COUNTER} with integers beyond "
                        "2**53, which the aggregation in float64 cannot hold exactly")


def test_a_failing_client_stops_the_run_with_its_message(task_identity):
    def broken_trainer(model, data, settings):
        raise ConfigError("local data is corrupt")

    run = small_run(clients=2, rounds=1)
    with pytest.raises(FederationError) as caught:
        run_server(InProcessGrid(make_client_app(run, local_trainer=broken_trainer), 2), run)
    # the same error from every client is named once, with the nodes that raised it
    assert str(caught.value) == ("round 1: 2 of 2 clients failed: ConfigError: local data is corrupt "
                                 "(nodes 1, 2)")


# What Flower's Ray backend puts in a failed reply (Flower 1.41, shortened): the worker's traceback
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
    "\x1b[39m (pid=27813, ip=192.0.2.2)\n  File \"/fortify/federated/client.py\", line 268, in "
    "client_round\n    result = local_trainer(model, shard, settings)\n"
    "fortify.errors.ConfigError: local data is corrupt\n\nThe above exception was the direct cause of "
    "the following exception:\n\n  File \"flwr/simulation/ray_transport/ray_actor.py\", line 65, in "
    "run\n    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app.ClientAppException: "
    "\nException ClientAppException occurred. Message: local data is corrupt'>")


@pytest.mark.parametrize(("reason", "line"), [
    (RAY_REASON, "local data is corrupt"),
    ("<class 'fortify.errors.ConfigError'>:<'local data\nis corrupt'>", "ConfigError: local data is corrupt"),
    ("ValueError: bad", "ValueError: bad"),
])
def test_a_clients_error_is_reported_as_one_line_of_its_own_message(reason, line):
    assert one_line_reason(reason) == line


def test_bad_runs_are_refused_before_any_client_starts():
    with pytest.raises(ConfigError, match="5000 clients"):
        validate_run(small_run(clients=5000))
    with pytest.raises(ConfigError, match="malicious_clients must be below"):
        validate_run(small_run(clients=2, malicious_clients=2))
    with pytest.raises(ConfigError, match="valid names"):
        validate_run(small_run(objective="pgdd"))
    with pytest.raises(ConfigError, match="federation.rounds"):
        small_run(rounds=0)


def test_an_infeasible_dirichlet_partition_is_refused_before_any_client_starts():
    # Dir(0.01) gives each class to about one client: most of 50 clients would hold nothing
    with pytest.raises(ConfigError, match=r"no Dirichlet\(alpha=0.01\) partition in 100 draws .* 50 clients"):
        validate_run(small_run(clients=50, partition="dirichlet", alpha=0.01))
    validate_run(small_run(clients=4, partition="dirichlet", alpha=0.5))


@pytest.mark.parametrize(("clients", "malicious", "message"), [
    (4, 1, r"krum with 1 malicious clients needs at least 5 clients \(n >= 2f \+ 3\), got 4; "
           "with 4 clients use at most 0 malicious clients"),
    (6, 2, "needs at least 7 clients .* with 6 clients use at most 1 malicious"),
    (2, 0, "needs at least 3 clients .* got 2; krum needs at least 3 clients"),
])
def test_krum_with_too_few_clients_for_its_malicious_ones_is_refused(clients, malicious, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(small_run(clients=clients, strategy="krum", malicious_clients=malicious))


def test_krum_at_its_bound_is_accepted():
    validate_run(small_run(clients=5, strategy="krum", malicious_clients=1))
    validate_run(small_run(clients=3, strategy="krum"))


def test_a_trimmed_mean_that_trims_nothing_is_refused_with_the_clients_it_needs():
    expected = (r"trim_beta=0.25 trims int\(0.25 \* 3\) = 0 of 3 clients .* at least 4 clients or "
                r"--trim-beta \(federation.trim_beta\) >= 0.334")
    with pytest.raises(ConfigError, match=expected):
        validate_run(small_run(clients=3, strategy="trimmed-mean"))
    with pytest.raises(ConfigError, match="at least 10 clients$"):
        validate_run(small_run(clients=2, strategy="trimmed-mean", trim_beta=0.1))
    validate_run(small_run(clients=4, strategy="trimmed-mean"))  # trims one update at each end
    validate_run(small_run(clients=2, strategy="trimmed-mean", trim_beta=0.0))  # asked for no trimming


DP = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}


@pytest.mark.parametrize(("settings", "message"), [
    ({"dp": {"enabled": True, "target_epsilon": 1.0}}, "federated DP needs dp.noise_multiplier"),
    ({"dp": DP, "model": "preact-resnet18"}, "federated DP needs a model without BatchNorm .* "
                                               "layers.0.0.bn1: BatchNorm2d -> GroupNorm"),
    ({"dp": DP, "objective": "free"}, "objective 'free' cannot be trained with DP; valid: standard"),
    ({"dp": DP, "train": {"amp": True}}, "train.amp and train.grad_clip do not apply to DP training"),
    ({"dp": {**DP, "noise_seed": 0}}, r"does not use dp.noise_seed=0 \(the server could replay each "
                                      r"client's noise from it\)"),
])
def test_client_side_dp_settings_a_client_would_refuse_are_refused_before_any_client_starts(
        settings, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(small_run(**settings))


def test_dp_delta_is_checked_against_the_largest_client_shard():
    # Prepare: a skewed partition, so the shards differ in size; delta < 1/n must hold for each
    run = small_run(clients=3, partition="dirichlet", alpha=0.5, dp=DP)
    sizes = sorted(len(s) for s in shard_indices(load_run_dataset(run).train.y, 3, scheme="dirichlet",
                                                 alpha=0.5))
    assert sizes[0] < sizes[-1]
    between = (1 / sizes[0] + 1 / sizes[-1]) / 2  # fine for the smallest shard, not for the largest
    # Execute and assert
    with pytest.raises(ConfigError, match=rf"n={sizes[-1]} training examples \(the largest of the 3 client "):
        validate_run(small_run(clients=3, partition="dirichlet", alpha=0.5, dp={**DP, "delta": between}))
    validate_run(small_run(clients=3, partition="dirichlet", alpha=0.5,
                           dp={**DP, "delta": 0.9 / sizes[-1]}))


def test_a_stopped_simulation_ends_the_servers_wait_for_replies(task_identity):
    # Prepare: clients that never reply, as after a Ctrl-C has ended Flower's runtime; the stop comes
    # while the server waits for them
    stop = threading.Event()

    class Silent(InProcessGrid):
        def push_messages(self, messages):
            return [f"id-{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, message_ids):
            stop.set()
            return []

    run = small_run()
    grid = StoppableGrid(Silent(make_client_app(run), 2), stop)
    # Execute / Assert: the wait ends at the stop, not at the hour-long reply timeout
    with pytest.raises(FederationError, match="stopped before every client replied"):
        grid.send_and_receive([object(), object()], timeout=3600)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dp": {"canaries": 10}}, "does not use dp.canaries=10"),
    ({"train": {"extra_data": "more.npz", "extra_fraction": 0.5}}, "does not use train.extra_data=more.npz"),
    ({"data": {"name": "breast-cancer", "feature_schema": "breast-cancer"}},
     "does not use data.feature_schema=breast-cancer"),
    # a client's Trainer is new every round: these would restart each round
    ({"train": {"ema_decay": 0.99}}, "does not use train.ema_decay=0.99 .*restart every round"),
    ({"train": {"eps_warmup_epochs": 2}}, "does not use train.eps_warmup_epochs=2 .*restart every round"),
    ({"train": {"awp_warmup_epochs": 2}}, "does not use train.awp_warmup_epochs=2 .*restart every round"),
])
def test_train_settings_that_clients_would_drop_are_refused(overrides, message):
    run = load_federated_run(None, {"model": {"name": "mlp"}, **overrides}, {"clients": 2})
    with pytest.raises(ConfigError, match=message):
        validate_run(run)
