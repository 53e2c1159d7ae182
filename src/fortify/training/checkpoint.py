"""Checkpoints that are safe to load: tensors in safetensors, everything else in JSON.

Nothing here unpickles. Every tensor file carries fortify's format marker in its metadata, and
``state.json`` records the SHA-256 of each tensor file, so a foreign or edited file is refused
with a clear message instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fortify.errors import CheckpointError

FORMAT = "fortify"
FORMAT_VERSION = "1"
STATE_JSON = "state.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor], kind: str) -> str:
    """Write tensors with fortify's marker; returns the file's SHA-256."""
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"format": FORMAT, "version": FORMAT_VERSION,
                                              "kind": kind})
    digest = sha256(tmp)
    os.replace(tmp, path)
    return digest


def load_tensors(path: Path, kind: str, expected_sha256: str | None = None, *,
                 record: str = STATE_JSON) -> dict[str, Tensor]:
    """Read a fortify tensor file, refusing anything foreign, of another kind or tampered with;
    ``record`` names the file that holds ``expected_sha256`` (for the message)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
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
    model.load_state_dict(tensors)


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


def join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def write_state_json(run_dir: Path, state: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    _atomic_write_text(run_dir / STATE_JSON, json.dumps(payload, indent=2))


def read_state_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: {STATE_JSON} is missing")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fortify state file")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has version {state.get('version')!r}; "
                              f"this fortify reads version {FORMAT_VERSION}")
    return state


