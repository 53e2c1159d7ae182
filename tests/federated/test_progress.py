"""A federation saves its progress after every round and resumes from it (in-process clients)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import replace

import pytest
import torch
from fedkit import BATCHNORM_MLP, InProcessGrid, small_run
from flwr.app import Message
from safetensors.torch import load_file

from fortify.errors import CheckpointError, ConfigError
from fortify.federated.client import make_client_app
from fortify.federated.config import FederatedRun
from fortify.federated.progress import PROGRESS_JSON
from fortify.federated.results import read_result
from fortify.federated.server import run_server

ROUNDS = 3


class InterruptedGrid(InProcessGrid):
    """Delivers messages until the given exchange, then stops the run as a Ctrl-C would."""

    def __init__(self, run: FederatedRun, stop_at_exchange: int) -> None:
        super().__init__(make_client_app(run), run.federation.clients)
        self.exchanges, self.stop_at = 0, stop_at_exchange

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        self.exchanges += 1
        if self.exchanges == self.stop_at:
            raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


def _fed_run(out, **changes) -> FederatedRun:
    return small_run(clients=2, rounds=ROUNDS, out=str(out), **changes)


def _resumed(run: FederatedRun) -> FederatedRun:
    return replace(run, federation=run.federation.model_copy(update={"resume": True}))


def _interrupt_in_round_two(run: FederatedRun) -> None:
    # each round is two exchanges (training, then the empty client evaluation): the 3rd is round 2's training
    with pytest.raises(KeyboardInterrupt):
        run_server(InterruptedGrid(run, stop_at_exchange=3), run)


@pytest.mark.parametrize("settings", [
    {},
    # Dirichlet shards differ in size, so the clients' BatchNorm counts differ and their mean is no
    # whole number: the saved model must hold the count the uninterrupted run goes on from
    {"model": BATCHNORM_MLP, "partition": "dirichlet", "alpha": 0.5},
])
def test_a_federation_interrupted_in_a_round_resumes_to_the_uninterrupted_result(task_identity, batchnorm_mlp,
                                                                              tmp_path, settings):
    # Prepare: one run straight through, one stopped in round 2
    straight = run_server(InProcessGrid(make_client_app(run := _fed_run(tmp_path / "a", **settings)), 2), run)
    interrupted = _fed_run(tmp_path / "b", **settings)
    _interrupt_in_round_two(interrupted)
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1]
    # Execute
    resumed = run_server(InProcessGrid(make_client_app(interrupted), 2), _resumed(interrupted))
    # Assert: same rounds, same numbers, same weights (clients seeded by the run's own round numbers)
    assert [r.round for r in resumed.rounds] == list(range(ROUNDS + 1))
    for mine, theirs in zip(resumed.rounds, straight.rounds, strict=True):
        assert (mine.clean_accuracy, mine.robust_accuracy) == pytest.approx(
            (theirs.clean_accuracy, theirs.robust_accuracy), abs=1e-9)
    assert set(resumed.train_metrics) == set(straight.train_metrics) == {1, 2, 3}
    for r in straight.train_metrics:
        assert resumed.train_metrics[r] == pytest.approx(straight.train_metrics[r], rel=1e-5)
    weights_a, weights_b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert weights_a.keys() == weights_b.keys()
    assert all(weights_a[k].dtype == weights_b[k].dtype for k in weights_a)
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a)
    # resumed once more, the finished run is only read back: no round is trained again
    again = run_server(InterruptedGrid(interrupted, stop_at_exchange=1), _resumed(interrupted))
    assert again.rounds == resumed.rounds


def test_a_dp_run_whose_epsilon_is_infinite_resumes(task_identity, tmp_path):
    # Prepare: noise 0 is allowed and spends an infinite epsilon, which the progress file holds as null
    run = _fed_run(tmp_path / "b", dp={"enabled": True, "noise_multiplier": 0.0, "delta": 1e-4})
    _interrupt_in_round_two(run)
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert saved["train_metrics"]["1"]["dp-epsilon-max"] is None
    # Execute
    resumed = run_server(InProcessGrid(make_client_app(run), 2), _resumed(run))
    # Assert
    assert [r.round for r in resumed.rounds] == list(range(ROUNDS + 1))
    assert resumed.train_metrics[1]["dp-epsilon-max"] == math.inf


def test_a_round_cut_off_counts_in_the_epsilon_of_the_rounds_after_it(task_identity, tmp_path):
    # Prepare: noisy DP-SGD clients (their noise from OS entropy, their epsilon from the steps); a
    # straight run one round longer gives the epsilon of every number of rounds up to 4
    dp = {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4}
    longer = small_run(clients=2, rounds=ROUNDS + 1, out=str(tmp_path / "a"), dp=dp)
    straight = run_server(InProcessGrid(make_client_app(longer), 2), longer)
    spent = {r: straight.train_metrics[r]["dp-epsilon-max"] for r in range(1, ROUNDS + 2)}
    assert spent[1] < spent[2] < spent[3] < spent[4] < math.inf
    interrupted = _fed_run(tmp_path / "b", dp=dp)
    _interrupt_in_round_two(interrupted)  # round 2's train messages were made: they may have gone out
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert (saved["round_started"], saved["rounds_cut_off"]) == (2, 0)
    # Execute
    resumed = run_server(InProcessGrid(make_client_app(interrupted), 2), _resumed(interrupted))
    # Assert: round 1 spent what one round spends; rounds 2 and 3 also count the round cut off
    assert resumed.rounds_cut_off == 1
    assert resumed.train_metrics[1]["dp-epsilon-max"] == pytest.approx(spent[1], rel=1e-9)
    assert [resumed.train_metrics[r]["dp-epsilon-max"] for r in (2, 3)] == pytest.approx(
        [spent[3], spent[4]], rel=1e-9)
    assert read_result(tmp_path / "b").rounds_cut_off == 1


def test_every_interruption_of_a_round_counts_once(task_identity, tmp_path):
    # Prepare: cut off in round 2, then the resumed run cut off in round 2 again
    run = _fed_run(tmp_path / "b", dp={"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4})
    _interrupt_in_round_two(run)
    with pytest.raises(KeyboardInterrupt):  # the resumed run's 1st exchange is round 2's training
        run_server(InterruptedGrid(run, stop_at_exchange=1), _resumed(run))
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert (saved["round_started"], saved["rounds_cut_off"]) == (2, 1)
    # Execute
    resumed = run_server(InProcessGrid(make_client_app(run), 2), _resumed(run))
    # Assert: two cut-off rounds, and the finished run read back keeps the count
    assert resumed.rounds_cut_off == 2
    assert run_server(InProcessGrid(make_client_app(run), 2), _resumed(run)).rounds_cut_off == 2
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert (saved["round_started"], saved["rounds_cut_off"]) == (ROUNDS, 2)


def test_a_run_never_cut_off_counts_no_round_twice(task_identity, tmp_path):
    run = _fed_run(tmp_path / "b")
    result = run_server(InProcessGrid(make_client_app(run), 2), run)
    saved = json.loads((tmp_path / "b" / PROGRESS_JSON).read_text())
    assert (result.rounds_cut_off, saved["round_started"], saved["rounds_cut_off"]) == (0, ROUNDS, 0)


def test_resuming_under_other_settings_is_refused_by_name(task_identity, tmp_path):
    run = _fed_run(tmp_path / "b")
    _interrupt_in_round_two(run)
    other = _resumed(_fed_run(tmp_path / "b", train={"lr": 0.1}))
    with pytest.raises(ConfigError, match="train.lr was 0.05, now 0.1"):
        run_server(InProcessGrid(make_client_app(other), 2), other)


def _edit_progress(run_dir, edit) -> None:
    progress = json.loads((run_dir / PROGRESS_JSON).read_text())
    edit(progress)
    (run_dir / PROGRESS_JSON).write_text(json.dumps(progress))


def test_a_server_started_afresh_on_a_saved_federation_refuses_to_overwrite_it(task_identity, tmp_path):
    # `flwr run` started by hand without federation.resume used to replace the record and delete the
    # saved rounds' weights; the CLI's own check of --out does not see that path
    run = _fed_run(tmp_path / "b")
    _interrupt_in_round_two(run)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(ConfigError, match="already holds a federation .federation-progress.json.; set "
                                          "federation.resume=true"):
        run_server(InProcessGrid(make_client_app(run), 2), run)
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def _weights_of(run_dir):
    return run_dir / json.loads((run_dir / PROGRESS_JSON).read_text())["weights"]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / PROGRESS_JSON).write_text('{"format": "fortify", "rounds": ['), "not valid JSON"),
    (lambda d: (d / PROGRESS_JSON).write_text('{"format": "fortify", "rounds": []}'),
     "not a fortify federation record"),
    (lambda d: _weights_of(d).write_bytes(_weights_of(d).read_bytes()[:-8] + b"\0" * 8),
     "does not match the hash recorded in federation-progress.json"),
    (lambda d: (d / PROGRESS_JSON).write_text((d / PROGRESS_JSON).read_text().replace(
        "federation-round-1.safetensors", "../model.safetensors")), "not a fortify federation record"),
    # edited records: each was accepted, the first marking a 3-round run finished at "round 7"
    (lambda d: _edit_progress(d, lambda p: p["rounds"][-1].update(round=7)),
     "not a fortify federation record"),
    (lambda d: _edit_progress(d, lambda p: p["rounds"][0].update(clean_accuracy=1.5)),
     "not a fortify federation record"),
    (lambda d: _edit_progress(d, lambda p: p["train_metrics"].update({"2": {"train-loss": 0.1}})),
     "not a fortify federation record"),
    # a start marker or a count of rounds cut off that no run writes (the count only lowers epsilon)
    (lambda d: _edit_progress(d, lambda p: p.update(round_started=4)), "not a fortify federation record"),
    (lambda d: _edit_progress(d, lambda p: p.update(rounds_cut_off=-1)), "not a fortify federation record"),
    (lambda d: _edit_progress(d, lambda p: p.update(rounds_cut_off=True)), "not a fortify federation record"),
    (lambda d: _edit_progress(d, lambda p: p.update(round_started=ROUNDS + 2) or p["rounds"].extend(
        dict(p["rounds"][-1], round=r) for r in range(2, ROUNDS + 3))), "records round 5 of a run of 3"),
])
def test_damaged_progress_is_refused(task_identity, tmp_path, damage, message):
    run = _fed_run(tmp_path / "b")
    _interrupt_in_round_two(run)
    damage(tmp_path / "b")
    with pytest.raises(CheckpointError, match=message):
        run_server(InProcessGrid(make_client_app(run), 2), _resumed(run))


def test_a_run_stopped_after_evaluating_the_initial_model_records_round_0_once(task_identity, tmp_path):
    run = _fed_run(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):  # the 1st exchange is round 1's training
        run_server(InterruptedGrid(run, stop_at_exchange=1), run)
    resumed = run_server(InProcessGrid(make_client_app(run), 2), _resumed(run))
    assert [r.round for r in resumed.rounds] == list(range(ROUNDS + 1))
    only = list((tmp_path / "b").glob("federation-round-*.safetensors"))
    assert [p.name for p in only] == [f"federation-round-{ROUNDS}.safetensors"]  # older rounds' removed
