"""A federation's progress on disk, so that an interrupted run resumes at its last finished round.

After the central evaluation of every round (and of the initial model) the server writes the global
weights (``federation-round-R.safetensors``) and ``federation-progress.json``: the settings, the rounds
finished, their records and the clients' metrics, and the weights' SHA-256. With
``federation.resume`` the server reads them back, checks that the settings are the run's, and lets
Flower's strategy run only the rounds left, starting from the saved weights. Rounds keep their
numbers: every train message carries the offset, so clients seed their local training and
compose their DP budget exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fortify.config import NOT_RESULT_SETTINGS, listed, setting_differences
from fortify.errors import CheckpointError, ConfigError
from fortify.federated.config import FederatedRun
from fortify.federated.results import RESULT_FILE, RoundRecord, stored_metric
from fortify.pipeline import write_json
from fortify.training import checkpoint as ckpt

PROGRESS_JSON = "federation-progress.json"
# one weights file per saved round, named in the record: the record is replaced only once the new
# round's weights are on disk, so a kill between the two writes leaves the previous pair intact
WEIGHTS_PATTERN = re.compile(r"federation-round-\d+\.safetensors")
ROUND_OFFSET_KEY = "round-offset"  # in every train message: rounds finished before this process
# where and how, not what is trained: the run directory, resuming, and config.NOT_RESULT_SETTINGS
_NOT_SETTINGS = frozenset({"federation.out", "federation.resume"} | {
    f"{section}.{key}" for section, keys in NOT_RESULT_SETTINGS.items() for key in keys})


def run_settings(run: FederatedRun) -> dict[str, Any]:
    """The flat settings a resumed run must share with the one it continues."""
    return {k: v for k, v in run.to_run_config().items() if k not in _NOT_SETTINGS}


@dataclass
class FederationProgress:
    """The rounds a federation has finished; ``offset`` of them before this process started."""

    run: FederatedRun
    offset: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def begin(cls, run: FederatedRun, model: nn.Module) -> FederationProgress:
        """Fresh progress, or with ``federation.resume`` the saved one (its weights into ``model``)."""
        out = Path(run.federation.out) if run.federation.out else None
        if out is not None and not run.federation.resume:
            _check_holds_no_federation(out)
        if not run.federation.resume or out is None or not (out / PROGRESS_JSON).is_file():
            return cls(run)
        saved = read_progress(run)
        ckpt.load_weights(out / saved["weights"], model, expected_sha256=saved["sha256"],
                          record=PROGRESS_JSON)
        rounds = saved["rounds"]
        return cls(run, offset=rounds[-1].round, rounds=rounds, train_metrics=saved["train_metrics"],
                   seconds_before=float(saved["seconds"]))

    @property
    def rounds_left(self) -> int:
        return self.run.federation.rounds - self.offset

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def add_train_metrics(self, server_round: int, metrics: dict[str, Any]) -> None:
        """The clients' aggregated metrics of this process's round ``server_round``."""
        self.train_metrics[server_round + self.offset] = {k: float(v) for k, v in metrics.items()}

    def finish_round(self, server_round: int, clean: float, robust: float, model: nn.Module) -> None:
        """Record this process's round ``server_round`` (0: the starting model) and save it."""
        self.rounds.append(RoundRecord(server_round + self.offset, clean, robust, self.seconds))
        out = self.run.federation.out
        if out:
            self._save(Path(out), model)

    def _save(self, out: Path, model: nn.Module) -> None:
        out.mkdir(parents=True, exist_ok=True)
        weights = f"federation-round-{self.rounds[-1].round}.safetensors"
        digest = ckpt.save_weights(out / weights, model)  # first: the record names it and its hash
        write_json(out / PROGRESS_JSON, {
            "format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "settings": run_settings(self.run),
            "rounds": [asdict(r) for r in self.rounds],
            "train_metrics": {str(k): v for k, v in self.train_metrics.items()},
            "seconds": self.seconds, "weights": weights, "sha256": digest})
        for older in out.glob("federation-round-*.safetensors"):
            if older.name != weights:
                older.unlink(missing_ok=True)


def _check_holds_no_federation(out: Path) -> None:
    """ConfigError when ``out`` already holds a federation's records: a ServerApp started without
    ``federation.resume`` (``flwr run`` by hand, which the CLI's check of ``--out`` does not guard)
    would otherwise replace them and delete the saved rounds' weights."""
    found = [name for name in (PROGRESS_JSON, RESULT_FILE, ckpt.STATE_JSON) if (out / name).exists()]
    if found:
        raise ConfigError(f"{out} already holds a federation ({', '.join(found)}); set "
                          "federation.resume=true to continue it, or choose another out")


def read_progress(run: FederatedRun) -> dict[str, Any]:
    """The progress saved in the run's ``out``, refused when it was made with other settings or
    holds more rounds than the run has."""
    out = Path(run.federation.out)
    saved = _read(out)
    _check_same_settings(out, saved["settings"], run_settings(run))
    if saved["rounds"][-1].round > run.federation.rounds:
        raise CheckpointError(f"{out / PROGRESS_JSON} records round {saved['rounds'][-1].round} of a run of "
                              f"{run.federation.rounds}; remove {out} to start the federation again")
    return saved


def _read(out: Path) -> dict[str, Any]:
    """The saved progress, its rounds as RoundRecords and its metrics' rounds as ints; a damaged
    file is a CheckpointError here rather than a traceback later."""
    path = out / PROGRESS_JSON
    if not path.is_file():
        raise CheckpointError(f"{out} holds no {PROGRESS_JSON}, so there is no federation to resume in it")
    saved = ckpt.read_json(path, f"; remove {out} to start the federation again")
    fields = {"settings": dict, "rounds": list, "train_metrics": dict, "seconds": (int, float), "sha256": str,
              "weights": str}
    try:
        if saved.get("format") != ckpt.FORMAT or any(not isinstance(saved.get(name), kind)
                                                     for name, kind in fields.items()):
            raise TypeError("not a federation record")
        if not WEIGHTS_PATTERN.fullmatch(saved["weights"]):  # a file name of ours, never a path
            raise ValueError("weights file")
        saved["rounds"] = [RoundRecord(**record) for record in saved["rounds"]]
        if not saved["rounds"] or not all(_plausible(r) for r in saved["rounds"]):
            raise TypeError("no finished round, or a record out of range")
        # rounds 0 (the initial model), 1, ..., k in order: resuming continues after the last one
        if [r.round for r in saved["rounds"]] != list(range(len(saved["rounds"]))):
            raise ValueError("rounds out of order")
        saved["train_metrics"] = {int(k): {name: stored_metric(v) for name, v in m.items()}
                                  for k, m in saved["train_metrics"].items()}
        if not set(saved["train_metrics"]) <= set(range(1, len(saved["rounds"]))):
            raise ValueError("metrics of a round not finished")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a fortify federation record; remove {out} to start "
                              "again") from None
    return saved


def _plausible(record: RoundRecord) -> bool:
    """A whole round number, accuracies in [0, 1] and finite seconds >= 0."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (isinstance(record.round, int) and not isinstance(record.round, bool)
            and all(number(a) and 0.0 <= a <= 1.0 for a in (record.clean_accuracy, record.robust_accuracy))
            and number(record.seconds) and 0.0 <= record.seconds < math.inf)


def _check_same_settings(out: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    differing = setting_differences(saved, now)
    if differing:
        raise ConfigError(f"cannot resume {out}: {listed(differing)}; give the settings it was started "
                          "with, or start a new run elsewhere")
