"""A resumable record of an evaluation in progress.

Long evaluations (an AutoAttack-style cascade over thousands of examples) are written down after
every batch: finished attacks as JSON, the current attack's per-example outcomes as safetensors (a
file per batch, which the JSON then names). A killed evaluation started again with the same journal
path continues at the next batch and produces the same numbers. A journal made for other data or
other attacks is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack
from fortify.errors import CheckpointError
from fortify.models.digest import tensor_bytes, update_with_weights
from fortify.training import checkpoint as ckpt


@dataclass
class Partial:
    """The attack under way: how far it got and what it found so far. Each batch draws from a seed of
    its own (``batch_seed``), so no generator state needs keeping."""

    attack_index: int
    next_start: int
    robust: Tensor
    norms: Tensor


def fingerprint(x: Tensor, y: Tensor, attacks: Sequence[Attack], cascade: bool, batch_size: int,
                amp: str | None = None, *, model: nn.Module, clean_correct: Tensor) -> str:
    """What a journal's partial results depend on; a journal written under another is not reused.

    The model enters by its weights and buffers (a retrained model in the same directory must not
    inherit the old one's outcomes) and by which examples it classifies correctly (for models whose
    weights torch does not see, such as a wrapped Keras model).
    """
    digest = hashlib.sha256()
    for tensor in (x, y, clean_correct.to(torch.uint8)):
        digest.update(tensor_bytes(tensor))
    update_with_weights(digest, model)
    # the threat model whole (its box and a tabular schema's constraints too, which describe() leaves
    # out): points found inside one box are no answer for another
    settings = [{**a.describe(), "threat": a.threat.to_dict()} for a in attacks]
    # amp only enters when set, so journals of full-precision runs keep their fingerprint
    key: list[object] = [settings, cascade, batch_size] + ([amp] if amp else [])
    digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def start_afresh(directory: Path) -> str:
    """The way out of a journal that cannot be continued, for every error that refuses one."""
    return f"remove {directory} (fortify evaluate --restart does) to evaluate from the start"


class Journal:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self._json = self.directory / "evaluation.json"
        self._state = self._read()

    def completed(self) -> list[dict[str, Any]]:
        return list(self._state["completed"])

    def partial(self, attack_index: int) -> Partial | None:
        current = self._state.get("current")
        if current is None or current["attack_index"] != attack_index:
            return None
        try:
            tensors = ckpt.load_tensors(self._tensor_file(current), "evaluation", current["sha256"],
                                        record=self._json.name)
        except CheckpointError as err:  # a batch file gone or damaged
            raise CheckpointError(f"{err}; {start_afresh(self.directory)}") from None
        if not {"robust", "norms"} <= tensors.keys():
            raise CheckpointError(f"{self._tensor_file(current)} lacks the outcomes of the attack under "
                                  f"way; {start_afresh(self.directory)}")
        return Partial(attack_index, current["next_start"], tensors["robust"].bool(), tensors["norms"])

    def save_partial(self, partial: Partial) -> None:
        """Each batch's outcomes go to a file of their own, which evaluation.json then names: a kill
        between the two writes leaves the journal at the batch before, whole."""
        before = self._state.get("current")
        name = f"evaluation-{partial.attack_index}-{partial.next_start}.safetensors"
        digest = ckpt.save_tensors(self.directory / name, {
            "robust": partial.robust.to(torch.uint8), "norms": partial.norms}, kind="evaluation")
        self._state["current"] = {"attack_index": partial.attack_index,
                                  "next_start": partial.next_start, "sha256": digest, "file": name}
        self._write()
        self._remove_tensor_file(before)

    def save_completed(self, result: dict[str, Any]) -> None:
        before = self._state.get("current")
        self._state["completed"].append(result)
        self._state["current"] = None
        self._write()
        self._remove_tensor_file(before)

    def _tensor_file(self, current: dict[str, Any]) -> Path:
        return self.directory / current["file"]

    def _remove_tensor_file(self, current: dict[str, Any] | None) -> None:
        if current is not None:
            self._tensor_file(current).unlink(missing_ok=True)

    def _read(self) -> dict[str, Any]:
        if not self._json.is_file():
            return {"fingerprint": self.fingerprint, "completed": [], "current": None}
        try:
            state = ckpt.read_json(self._json)
        except CheckpointError as err:  # cut off, say, by a full disk
            raise CheckpointError(f"{err}; {start_afresh(self.directory)}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._json} does not hold a journal object; "
                                  f"{start_afresh(self.directory)}")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self._json} records an unfinished evaluation of other data or other "
                                  f"attack settings; remove {self.directory} (fortify evaluate --restart "
                                  "does) to start this one afresh, or rerun the interrupted evaluation's "
                                  "command to finish it")
        if not (isinstance(state.get("completed"), list) and _is_current(state.get("current"))):
            raise CheckpointError(f"{self._json} is damaged: it needs 'completed' (a list) and 'current' "
                                  f"(null, or attack_index, next_start, sha256 and file); "
                                  f"{start_afresh(self.directory)}")
        if _RECORDS_HASH not in state:
            raise CheckpointError(f"{self._json} holds no hash of its records (an earlier fortify wrote "
                                  f"it, or it was edited), so its records cannot be checked; "
                                  f"{start_afresh(self.directory)}")
        if state[_RECORDS_HASH] != records_sha256(state):
            raise CheckpointError(f"{self._json} does not match the hash of its records: it was edited "
                                  f"after it was written; {start_afresh(self.directory)}")
        return state

    def _write(self) -> None:
        self._state[_RECORDS_HASH] = records_sha256(self._state)
        ckpt.atomic_write_text(self._json, json.dumps(self._state))


# The records' own hash: a finished attack's record may be edited consistently (robust flags and the
# count they give, norms and their summary), which the checks of each record cannot see
_RECORDS_HASH = "records_sha256"


def records_sha256(state: dict[str, Any]) -> str:
    records = [state.get("fingerprint"), state.get("completed"), state.get("current")]
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _is_current(current: Any) -> bool:
    """None, or the record of an attack under way as ``save_partial`` writes it."""
    if current is None:
        return True
    if not isinstance(current, dict):
        return False
    counts = [current.get(key) for key in ("attack_index", "next_start")]
    file = current.get("file")
    # a bare file name: a record must not point the journal at files outside its directory
    return (all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and isinstance(current.get("sha256"), str)
            and isinstance(file, str) and Path(file).name == file and file.endswith(".safetensors"))
