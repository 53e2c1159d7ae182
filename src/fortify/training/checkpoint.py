"""Checkpoints that are safe to load: tensors in safetensors, everything else in JSON.

Nothing here unpickles. Every tensor file carries fortify's format marker in its metadata, and
``state.json`` records the SHA-256 of each tensor file, so a foreign or edited file is refused
with a clear message instead of being loaded.

A training checkpoint spans several files, committed together with ``state.json`` as the single
commit point: each new tensor file is first written under a pending name (``stage_tensors``), then
``commit_state_json`` replaces state.json, which records the new hashes, and only then moves each
pending file onto its own name. A kill before state.json is replaced leaves the previous checkpoint
whole; a kill after it leaves pending files that ``settle_interrupted_commit`` moves into place when
the run resumes. Every file keeps its fixed name, so readers of a finished run see nothing new.
Each file's data and its directory entry are flushed to disk (fsync) before the next step, so the
same holds when the machine itself goes down: otherwise the OS may write a rename before the data
it names, and state.json could come back empty.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fortify.errors import CheckpointError

FORMAT = "fortify"
FORMAT_VERSION = "1"
STATE_JSON = "state.json"
# the suffix of a tensor file written for a checkpoint whose state.json is not yet written
PENDING = ".pending"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# the Trainer's counters in state.json["progress"] and the least value each may hold
_PROGRESS_COUNTERS = {"epoch": 0, "step": 0, "since_best": 0, "best_epoch": -1}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order: the same tensors
    give the same digest however a file lays them out."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def flush_to_disk(path: Path) -> None:
    """fsync ``path``'s data: a rename reaches the disk no later than the data it names."""
    with open(path, "rb+") as handle:  # Windows flushes only a handle open for writing
        os.fsync(handle.fileno())


def flush_directory(directory: Path) -> None:
    """fsync ``directory``: its new and renamed entries survive a crash of the machine. Where a
    directory cannot be opened for that (Windows), the entries are left to the OS."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def written_aside(path: Path) -> Path:
    """Where a file for ``path`` is written before it is renamed to ``path``: a run cut off in
    between leaves this name behind."""
    return path.with_name(path.name + ".tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` (UTF-8) whole, or what it held before: written aside, flushed, renamed."""
    tmp = written_aside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
    except OSError as err:  # a full disk: the half-written copy goes, what ``path`` held stays
        tmp.unlink(missing_ok=True)
        # a failed write names no file of its own; the error names the one that could not be written
        raise OSError(err.errno, err.strerror, str(path)) from None
    flush_to_disk(tmp)
    os.replace(tmp, path)
    flush_directory(path.parent)


def save_tensors(path: Path, tensors: dict[str, Tensor], kind: str) -> str:
    """Write tensors with fortify's marker; returns the file's SHA-256."""
    tmp = written_aside(path)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}
    try:
        save_file(_own_memory(tensors), str(tmp), metadata=metadata)
    except SafetensorError as err:  # safetensors reports I/O failures (a full disk) as its own error
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {err}") from None
    flush_to_disk(tmp)
    digest = sha256(tmp)
    os.replace(tmp, path)
    flush_directory(path.parent)
    return digest


def pending_path(path: Path) -> Path:
    """Where the next version of tensor file ``path`` waits for the state.json that commits it."""
    return path.with_name(path.name + PENDING)


def stage_tensors(path: Path, tensors: dict[str, Tensor], kind: str) -> str:
    """Write the next version of ``path`` under its pending name, leaving ``path`` as it is; returns
    its SHA-256, for the state.json that ``commit_state_json`` writes."""
    return save_tensors(pending_path(path), tensors, kind)


def _own_memory(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing memory with another.

    safetensors refuses tensors that share memory, which a model's state dict holds whenever one
    module sits at two places (tied or reused layers); such a tensor is copied, and loading copies it
    back into each of its names.
    """
    owned: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, value in tensors.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        owned[name] = value
    return owned


def load_tensors(path: Path, kind: str, expected_sha256: str | None = None, *,
                 record: str = STATE_JSON) -> dict[str, Tensor]:
    """Read a fortify tensor file, refusing anything foreign, of another kind or tampered with;
    ``record`` names the file that holds ``expected_sha256`` (for the message)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist{_mid_commit(path)}")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        if pending_path(path).is_file():
            raise CheckpointError(f"{path} does not match the hash recorded in {record}{_mid_commit(path)}")
        raise CheckpointError(
            f"{path} does not match the hash recorded in {record}: the file was modified "
            "after it was saved (or the save was interrupted); refusing to load it"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a fortify checkpoint (not a safetensors file: {err}); "
            "fortify never unpickles files such as torch.save outputs"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not one fortify wrote "
                              "(no fortify format marker)")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {metadata.get('version')!r}; "
                              f"this fortify reads version {FORMAT_VERSION}")
    if metadata.get("kind") != kind:
        raise CheckpointError(f"{path} holds {metadata.get('kind')!r}, expected {kind!r}")
    return tensors


def _mid_commit(path: Path) -> str:
    """The remedy for a file a checkpoint's commit has not yet moved into place, if it has one ('' if not).

    Readers leave the directory alone: rolling the commit forward here could race the run that is
    writing it, and then name a file state.json does not record. Resuming, the writer's own step,
    settles it.
    """
    if not pending_path(path).is_file():
        return ""
    return (f": its run stopped (or is still running) part-way through committing a checkpoint, whose "
            f"new version waits in {pending_path(path).name}; resume the run (--resume) to complete it")


def save_weights(path: Path, model: nn.Module) -> str:
    return save_tensors(path, dict(model.state_dict()), kind="weights")


def load_weights(path: Path, model: nn.Module, expected_sha256: str | None = None, *,
                 record: str = STATE_JSON) -> None:
    """Load weights into ``model``; names and shapes must match exactly."""
    tensors = load_tensors(path, "weights", expected_sha256, record=record)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong_shape[:5]}"
        )
    # load_state_dict would cast an int32 or float64 tensor to the model's dtype without a word, and
    # weights with a NaN would give a model that predicts no class: neither is a file fortify wrote
    wrong_dtype = sorted(k for k in own if own[k].dtype != tensors[k].dtype)
    if wrong_dtype:
        name, more = wrong_dtype[0], len(wrong_dtype) - 1
        raise CheckpointError(f"{path} does not fit this model: {name!r} is {tensors[name].dtype}, the "
                              f"model's is {own[name].dtype}" + (f" (and {more} more)" if more else ""))
    not_finite = sorted(k for k, t in tensors.items()
                        if t.is_floating_point() and not bool(t.isfinite().all()))
    if not_finite:
        raise CheckpointError(f"{path} holds weights that are NaN or infinite: {not_finite[:5]}")
    model.load_state_dict(tensors)


def check_shapes_fit(path: Path, model: nn.Module) -> None:
    """CheckpointError unless the tensors in ``path`` have ``model``'s names and shapes; reads the
    file's header only, so ``model`` may live on the meta device."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a fortify checkpoint (not a safetensors file: {err}); "
                              "fortify never unpickles files such as torch.save outputs") from None
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, wrong shape {wrong_shape[:5]}")


# -- optimizer state: tensors to safetensors, the rest to JSON --------------------------------

def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, Tensor], meta: Any) -> dict[str, Any]:
    if not _is_optimizer_meta(meta):
        raise CheckpointError(f"the optimizer state in {STATE_JSON} is missing or damaged: it needs "
                              "'param_groups' (a list) and 'scalars' (parameter index -> object)")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            if not index.isdigit():
                raise CheckpointError(f"optimizer tensor {name!r} does not name a parameter index")
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def write_state_json(run_dir: Path, state: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    atomic_write_text(run_dir / STATE_JSON, json.dumps(payload, indent=2))


def commit_state_json(run_dir: Path, state: dict[str, Any], staged: Iterable[str]) -> None:
    """Replace state.json, the commit point, then move each staged tensor file (named in ``staged``,
    its hash in ``state["sha256"]``) from its pending name onto its own."""
    write_state_json(run_dir, state)
    for name in staged:
        os.replace(pending_path(run_dir / name), run_dir / name)
    flush_directory(run_dir)  # the new names on disk too, before the run reports the epoch done


def settle_interrupted_commit(run_dir: Path) -> None:
    """Complete or undo the commit a kill interrupted, so that each file state.json names holds what it
    records; only the run that owns ``run_dir`` calls it (on resuming), never a reader.

    A pending file whose hash state.json records was committed: it takes its own name (roll forward).
    Any other was written for a state.json never written: it is deleted (roll back).
    """
    recorded = read_state_json(run_dir).get("sha256", {})
    for pending in sorted(run_dir.glob(f"*.safetensors{PENDING}")):
        name = pending.name.removesuffix(PENDING)
        if recorded.get(name) == sha256(pending):
            os.replace(pending, run_dir / name)
        else:
            pending.unlink()
    flush_directory(run_dir)


def read_json(path: Path, remedy: str = "") -> Any:
    """What the JSON file ``path`` holds; CheckpointError naming it (and ``remedy``) when it is not JSON."""
    try:
        return json.loads(path.read_text())
    # ValueError covers JSONDecodeError and a number of more digits than Python converts (4,300)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}){remedy}") from None


def read_state_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {STATE_JSON} is missing")
    state = read_json(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fortify state file")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has version {state.get('version')!r}; "
                              f"this fortify reads version {FORMAT_VERSION}")
    problem = _state_field_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path} is damaged: {problem}")
    return state


# -- the fields of state.json that loading and resuming use -----------------------------------
# Checked on reading: an edited field would otherwise surface as a TypeError deep in the Trainer,
# a negative step would run the schedule outside [0, 1], and a malformed sha256 would skip the
# tamper check.

def _state_field_problem(state: dict[str, Any]) -> str | None:
    hashes = state.get("sha256", {})
    if not isinstance(hashes, dict) or not all(
            isinstance(digest, str) and _SHA256_HEX.fullmatch(digest) for digest in hashes.values()):
        return "'sha256' must map file names to SHA-256 hex digests"
    if "finished" in state and not isinstance(state["finished"], bool):
        return f"'finished' must be true or false, got {state['finished']!r}"
    if state.get("optimizer") is not None and not _is_optimizer_meta(state["optimizer"]):
        return ("'optimizer' must hold 'param_groups' (a list of groups: distinct parameter indices and "
                "numeric settings) and 'scalars' (parameter index -> numeric settings)")
    if "progress" in state:
        return _progress_problem(state["progress"])
    return None


def _progress_problem(progress: Any) -> str | None:
    if not isinstance(progress, dict):
        return "'progress' must be an object"
    for name, least in _PROGRESS_COUNTERS.items():
        value = progress.get(name)
        if not _is_int(value) or value < least:
            return f"'progress.{name}' must be an integer >= {least}, got {value!r}"
    seconds = progress.get("seconds")
    if not _is_number(seconds) or not (math.isfinite(seconds) and seconds >= 0):
        return f"'progress.seconds' must be a finite number >= 0, got {seconds!r}"
    best_metric = progress.get("best_metric")
    # -inf before the first validation; NaN would lose every later comparison, so no epoch would be best
    if not _is_number(best_metric) or not (math.isfinite(best_metric) or best_metric == -math.inf):
        return f"'progress.best_metric' must be a finite number or -Infinity, got {best_metric!r}"
    history = progress.get("history")
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        return "'progress.history' must be a list of epoch records"
    numbers = [record.get("epoch") for record in history]
    if numbers != list(range(1, len(history) + 1)) or not all(_is_int(number) for number in numbers):
        return f"'progress.history' must hold epochs 1..{len(history)} in order, got epochs {numbers}"
    if progress["epoch"] != len(history):
        return f"'progress.epoch' is {progress['epoch']} but 'progress.history' holds {len(history)} epochs"
    best = progress["best_epoch"]
    if not (1 <= best <= len(history) if history else best == -1):
        return (f"'progress.best_epoch' must be an epoch of the history (1..{len(history)}), or -1 "
                f"before the first, got {best}")
    return None


def _is_optimizer_meta(meta: Any) -> bool:
    return (isinstance(meta, dict) and isinstance(meta.get("param_groups"), list)
            and all(_is_param_group(group) for group in meta["param_groups"])
            and isinstance(meta.get("scalars"), dict)
            and all(isinstance(index, str) and index.isdigit() and isinstance(entries, dict)
                    and all(_is_setting(value) for value in entries.values())
                    for index, entries in meta["scalars"].items()))


def _is_param_group(group: Any) -> bool:
    """An optimiser's parameter group: distinct parameter indices and its settings."""
    if not isinstance(group, dict):
        return False
    params = group.get("params")
    return (isinstance(params, list) and all(_is_int(index) and index >= 0 for index in params)
            and len(set(params)) == len(params)
            and all(_is_setting(value) for key, value in group.items() if key != "params"))


def _is_setting(value: Any) -> bool:
    """A value as torch's optimisers keep them: a finite number, true/false, null, or a list of finite
    numbers (Adam's betas). Anything else (a string for the momentum) fails inside the optimiser's
    step, after the run has resumed."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, list):
        return all(is_finite_number(item) for item in value)
    return is_finite_number(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A JSON number that is finite (JSON true is not 1)."""
    return _is_number(value) and math.isfinite(value)
