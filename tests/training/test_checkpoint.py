"""Checkpoints: round trip, and refusal of foreign, pickled, edited or other-version files."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fortify.errors import CheckpointError
from fortify.training import checkpoint as ckpt


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_weights_round_trip_exactly(tmp_path):
    source, target = _model(), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
                                                   torch.nn.Linear(3, 2))
    digest = ckpt.save_weights(tmp_path / "w.safetensors", source)
    ckpt.load_weights(tmp_path / "w.safetensors", target, expected_sha256=digest)
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def _weights_file(path, edit):
    """A weights file as fortify writes it, each tensor passed through ``edit`` first."""
    tensors = {k: edit(v).contiguous() for k, v in _model().state_dict().items()}
    save_file(tensors, str(path), metadata={"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION,
                                            "kind": "weights"})
    return path


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.float16, torch.bool])
def test_weights_of_another_dtype_are_refused_not_cast(tmp_path, dtype):
    path = _weights_file(tmp_path / "w.safetensors", lambda t: t.to(dtype))
    model = _model()
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(CheckpointError, match=f"is {dtype}, the model's is torch.float32"):
        ckpt.load_weights(path, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_weights_that_are_not_finite_are_refused(tmp_path, bad):
    path = _weights_file(tmp_path / "w.safetensors", lambda t: t * bad)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        ckpt.load_weights(path, _model())


class _Payload:
    """Unpickling this object would create a marker file: proof that nothing unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        ckpt.load_weights(path, _model())
    assert not marker.exists()


def test_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a fortify checkpoint"):
        ckpt.load_weights(path, _model())


def test_foreign_safetensors_without_marker_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="not one fortify wrote"):
        ckpt.load_weights(path, _model())


def test_other_version_and_other_kind_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(path), metadata={"format": "fortify", "version": "99",
                                                          "kind": "weights"})
    with pytest.raises(CheckpointError, match="version '99'"):
        ckpt.load_tensors(path, "weights")
    ckpt.save_tensors(path, {"a": torch.zeros(1)}, kind="train-state")
    with pytest.raises(CheckpointError, match="expected 'weights'"):
        ckpt.load_tensors(path, "weights")


def test_an_edited_file_fails_its_recorded_hash(tmp_path):
    path = tmp_path / "w.safetensors"
    digest = ckpt.save_weights(path, _model())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        ckpt.load_weights(path, _model(), expected_sha256=digest)


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    ckpt.save_weights(path, _model())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.load_weights(path, torch.nn.Sequential(torch.nn.Linear(4, 5)))


def test_state_json_checks(tmp_path):
    with pytest.raises(CheckpointError, match="state.json is missing"):
        ckpt.read_state_json(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a fortify state file"):
        ckpt.read_state_json(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.read_state_json(tmp_path)



def test_a_state_json_number_too_long_for_python_to_read_is_a_checkpoint_error(tmp_path):
    # Python refuses integers of more than 4,300 digits with a plain ValueError, not a JSONDecodeError
    (tmp_path / "state.json").write_text('{"format": "fortify", "version": "1", "progress": {"epoch": '
                                         + "1" * 5000 + "}}")
    with pytest.raises(CheckpointError, match="state.json is not valid JSON .*4300 digits"):
        ckpt.read_state_json(tmp_path)


def test_optimizer_state_round_trips():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 4)).sum().backward()
    opt.step()
    tensors, meta = ckpt.split_optimizer_state(opt.state_dict())
    json.dumps(meta)  # the non-tensor part must be plain JSON
    rebuilt = ckpt.join_optimizer_state(tensors, json.loads(json.dumps(meta)))
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(rebuilt)
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, fresh.state_dict()["state"][0][key])


def _write_state(run_dir, **fields):
    ckpt.write_state_json(run_dir, {"finished": False, "sha256": {"last.safetensors": "0" * 64},
                                    "optimizer": {"param_groups": [], "scalars": {}},
                                    "progress": {"epoch": 1, "step": 4, "best_metric": 0.5, "best_epoch": 1,
                                                 "since_best": 0, "history": [], "seconds": 1.0},
                                    **fields})


def test_a_well_formed_state_json_reads_back(tmp_path):
    _write_state(tmp_path, progress={"epoch": 0, "step": 0, "best_metric": -math.inf, "best_epoch": -1,
                                     "since_best": 0, "history": [], "seconds": 0.0})
    assert ckpt.read_state_json(tmp_path)["progress"]["best_metric"] == -math.inf


@pytest.mark.parametrize(("fields", "match"), [
    ({"sha256": ["last.safetensors"]}, "'sha256' must map file names to SHA-256 hex digests"),
    ({"sha256": {"last.safetensors": 12}}, "'sha256' must map"),
    ({"finished": "no"}, "'finished' must be true or false"),
    ({"optimizer": {"param_groups": []}}, "'optimizer' must hold"),
    ({"optimizer": {"param_groups": [], "scalars": {"x": {}}}}, "'optimizer' must hold"),
    ({"progress": []}, "'progress' must be an object"),
    ({"progress": {"epoch": "1"}}, r"'progress.epoch' must be an integer >= 0, got '1'"),
    ({"progress": {"epoch": 1, "step": -100, "best_epoch": 1, "since_best": 0}},
     r"'progress.step' must be an integer >= 0, got -100"),
    ({"progress": {"epoch": 1, "step": 2, "best_epoch": 1, "since_best": 0, "seconds": 1.0,
                   "best_metric": 0.5, "history": None}}, "'progress.history' must be a list"),
])
def test_a_damaged_state_json_field_is_a_checkpoint_error(tmp_path, fields, match):
    _write_state(tmp_path, **fields)
    with pytest.raises(CheckpointError, match=match):
        ckpt.read_state_json(tmp_path)


@pytest.mark.parametrize("meta", [None, {"param_groups": []}, {"param_groups": [], "scalars": {"x": {}}}])
def test_damaged_optimizer_meta_is_a_checkpoint_error(meta):
    with pytest.raises(CheckpointError, match="optimizer state in state.json is missing or damaged"):
        ckpt.join_optimizer_state({}, meta)


def test_a_model_that_reuses_a_layer_saves_and_loads(tmp_path):
    # one Linear at two places: its weight and bias appear under two names each in the state dict
    def reusing() -> torch.nn.Module:
        shared = torch.nn.Linear(4, 4)
        return torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(4, 2))

    torch.manual_seed(0)
    model, path = reusing(), tmp_path / "w.safetensors"
    ckpt.save_weights(path, model)
    fresh = reusing()
    ckpt.load_weights(path, fresh)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh[0].weight is fresh[2].weight  # still one layer after loading


# -- a checkpoint of several files commits with state.json --------------------------------------

def _weights(seed):
    torch.manual_seed(seed)
    return {"w": torch.randn(3, 2)}


def _record(run_dir, **hashes):
    ckpt.write_state_json(run_dir, {"finished": False, "sha256": hashes})


def _holds(path, tensors, digest):
    loaded = ckpt.load_tensors(path, "weights", digest)
    return all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_staged_file_replaces_the_committed_one_only_when_state_json_commits(tmp_path):
    # Prepare: version 1 committed, version 2 staged
    path = tmp_path / "last.safetensors"
    old_digest = ckpt.save_tensors(path, _weights(1), kind="weights")
    _record(tmp_path, **{"last.safetensors": old_digest})
    new_digest = ckpt.stage_tensors(path, _weights(2), kind="weights")
    # Assert: until the commit, the committed file and state.json still agree
    assert _holds(path, _weights(1), old_digest)
    # Execute
    ckpt.commit_state_json(tmp_path, {"finished": False, "sha256": {"last.safetensors": new_digest}},
                           staged=["last.safetensors"])
    # Assert
    assert _holds(path, _weights(2), new_digest)
    assert not ckpt.pending_path(path).exists()


def test_settling_moves_a_pending_file_that_state_json_committed_into_place(tmp_path):
    # Prepare: killed after state.json was replaced, before the pending file was moved
    path = tmp_path / "last.safetensors"
    ckpt.save_tensors(path, _weights(1), kind="weights")
    new_digest = ckpt.stage_tensors(path, _weights(2), kind="weights")
    _record(tmp_path, **{"last.safetensors": new_digest})
    # Execute
    ckpt.settle_interrupted_commit(tmp_path)
    # Assert: rolled forward, and settling again changes nothing
    assert _holds(path, _weights(2), new_digest)
    assert not ckpt.pending_path(path).exists()
    ckpt.settle_interrupted_commit(tmp_path)
    assert _holds(path, _weights(2), new_digest)


def test_settling_deletes_a_pending_file_that_state_json_never_committed(tmp_path):
    # Prepare: killed before state.json was replaced; best.safetensors has no committed version yet
    path = tmp_path / "last.safetensors"
    old_digest = ckpt.save_tensors(path, _weights(1), kind="weights")
    _record(tmp_path, **{"last.safetensors": old_digest})
    ckpt.stage_tensors(path, _weights(2), kind="weights")
    ckpt.stage_tensors(tmp_path / "best.safetensors", _weights(3), kind="weights")
    # Execute
    ckpt.settle_interrupted_commit(tmp_path)
    # Assert: rolled back to the committed checkpoint
    assert _holds(path, _weights(1), old_digest)
    assert not list(tmp_path.glob("*" + ckpt.PENDING))
    assert not (tmp_path / "best.safetensors").exists()


@pytest.mark.parametrize("committed_before", [True, False])
def test_a_reader_meeting_a_commit_in_progress_is_told_to_resume_and_changes_nothing(tmp_path,
                                                                                     committed_before):
    # Prepare: state.json records the pending file's hash; the file under its own name is the previous
    # version, or (the first model.safetensors of a run) absent
    path = tmp_path / "model.safetensors"
    if committed_before:
        ckpt.save_tensors(path, _weights(1), kind="weights")
    new_digest = ckpt.stage_tensors(path, _weights(2), kind="weights")
    _record(tmp_path, **{"model.safetensors": new_digest})
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    # Execute, Assert
    remedy = r"waits in model.safetensors.pending; resume the run \(--resume\)"
    with pytest.raises(CheckpointError, match=remedy):
        ckpt.load_tensors(path, "weights", new_digest)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


class _DiskEvents:
    """Records, in order, each fsync (by the path its descriptor names) and each os.replace."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        fsync, replace = ckpt.os.fsync, ckpt.os.replace

        def recorded_fsync(descriptor: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
            fsync(descriptor)

        def recorded_replace(source, target) -> None:
            self.events.append(("replace", f"{source} -> {target}"))
            replace(source, target)

        monkeypatch.setattr(ckpt.os, "fsync", recorded_fsync)
        monkeypatch.setattr(ckpt.os, "replace", recorded_replace)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_a_commit_reaches_the_disk_data_first_then_each_name(tmp_path, monkeypatch):
    # A machine crash may write a rename before the data it names: each file is flushed before it
    # takes its name, and the directory after, so state.json never names data the disk lacks
    disk = _DiskEvents(monkeypatch)
    path = tmp_path / "last.safetensors"
    digest = ckpt.stage_tensors(path, _weights(1), kind="weights")
    ckpt.commit_state_json(tmp_path, {"finished": False, "sha256": {"last.safetensors": digest}},
                           staged=["last.safetensors"])
    directory = str(tmp_path.resolve())
    events = disk.events
    for source in (f"{path}.pending.tmp", f"{tmp_path / ckpt.STATE_JSON}.tmp"):
        moved = next(i for i, (kind, what) in enumerate(events)
                     if kind == "replace" and what.startswith(source + " "))
        assert ("fsync", str(Path(source).resolve())) in events[:moved], f"{source} renamed unflushed"
        assert ("fsync", directory) in events[moved + 1:], f"{source}'s new name left unflushed"
    # the staged file's flush and name come before state.json, the commit point, is written
    state_written = next(i for i, (kind, what) in enumerate(events)
                         if kind == "replace" and what.startswith(f"{tmp_path / ckpt.STATE_JSON}.tmp "))
    staged_named = next(i for i, (kind, what) in enumerate(events)
                        if kind == "replace" and what.startswith(f"{path}.pending.tmp "))
    assert staged_named < state_written
    assert ("fsync", directory) in events[staged_named + 1:state_written]
    # and the staged file's final name, after the commit point, reaches the disk before the call returns
    final_name = max(i for i, (kind, what) in enumerate(events)
                     if kind == "replace" and what.startswith(f"{path}.pending "))
    assert ("fsync", directory) in events[final_name + 1:], "the final rename left unflushed"
    assert _holds(path, _weights(1), digest)
