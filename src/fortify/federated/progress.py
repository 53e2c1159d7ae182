"""A federation's progress on disk, so that an interrupted run resumes at its last finished round.

After the central evaluation of every round (and of the initial model) the server writes the global
weights (``federation-round-R.safetensors``) and ``federation-progress.json``: the settings, the rounds
finished, their records and the clients' metrics, and the weights' SHA-256. With
``federation.resume`` the server reads them back, checks that the settings are the run's, and lets
Flower's strategy run only the rounds left, starting from the saved weights. Rounds keep their
numbers: every train message carries the offset, so clients seed their local training exactly as an
uninterrupted run would.

Before a round's train messages go out the server also marks the round as started. A round started
and never finished was cut off, but its clients may have sent their updates: a release under DP that
no client remembers, since clients keep no state between rounds. The rounds cut off so far travel in
every train message too, and clients compose their DP budget over them as well as over the rounds
finished, so the epsilon reported is never below what was spent (it counts a round whose messages
went out but whose replies never came back as spent).
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
ROUNDS_CUT_OFF_KEY = "rounds-cut-off"  # in every train message: rounds started, never finished, before it
# where and how, not what is trained: the run directory, resuming, and config.NOT_RESULT_SETTINGS
_NOT_SETTINGS = frozenset({"federation.out", "federation.resume"} | {
    f"{section}.{key}" for section, keys in NOT_RESULT_SETTINGS.items() for key in keys})


def run_settings(run: FederatedRun) -> dict[str, Any]:
    """The flat settings a resumed run must share with the one it continues."""
    return {k: v for k, v in run.to_run_config().items() if k not in _NOT_SETTINGS}


@dataclass
class FederationProgress:
    """The rounds a federation has finished, ``offset`` of them before this process started, and the
    ``cut_off`` rounds earlier processes started and never finished."""

    run: FederatedRun
    offset: int = 0
    cut_off: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    weights: tuple[str, str] | None = None  # the last saved round's weights file and its SHA-256

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
        cut_off = saved["rounds_cut_off"] + (saved["round_started"] > rounds[-1].round)
        return cls(run, offset=rounds[-1].round, cut_off=cut_off, rounds=rounds,
                   train_metrics=saved["train_metrics"], seconds_before=float(saved["seconds"]),
                   weights=(saved["weights"], saved["sha256"]))

    @property
    def rounds_left(self) -> int:
        return self.run.federation.rounds - self.offset

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def add_train_metrics(self, server_round: int, metrics: dict[str, Any]) -> None:
        """The clients' aggregated metrics of this process's round ``server_round``."""
        self.train_metrics[server_round + self.offset] = {k: float(v) for k, v in metrics.items()}

    def start_round(self, server_round: int) -> None:
        """Mark this process's round ``server_round`` as started, before its train messages go out:
        if the run is cut off before the round finishes, resuming counts it as cut off."""
        out = self.run.federation.out
        if out and self.weights is not None:
            write_json(Path(out) / PROGRESS_JSON, self._record(round_started=server_round + self.offset))

    def finish_round(self, server_round: int, clean: float, robust: float, model: nn.Module) -> None:
        """Record this process's round ``server_round`` (0: the starting model) and save it."""
        self.rounds.append(RoundRecord(server_round + self.offset, clean, robust, self.seconds))
        out = self.run.federation.out
        if out:
            self._save(Path(out), model)

    def _save(self, out: Path, model: nn.Module) -> None:
        out.mkdir(parents=True, exist_ok=True)
        weights = f"federation-round-{self.rounds[-1].round}.safetensors"
        # the weights first: the record names them and their hash
        self.weights = (weights, ckpt.save_weights(out / weights, model))
        write_json(out / PROGRESS_JSON, self._record(round_started=self.rounds[-1].round))
        for older in out.glob("federation-round-*.safetensors"):
            if older.name != weights:
                older.unlink(missing_ok=True)

    def _record(self, round_started: int) -> dict[str, Any]:
        assert self.weights is not None
        return {"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "settings": run_settings(self.run),
                "rounds": [asdict(r) for r in self.rounds],
                "train_metrics": {str(k): v for k, v in self.train_metrics.items()},
                "seconds": self.seconds, "weights": self.weights[0], "sha256": self.weights[1],
                "round_started": round_started, "rounds_cut_off": self.cut_off}


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
        # records written before rounds were marked as started lack these two: nothing was cut off
        last = saved["rounds"][-1].round
        saved.setdefault("round_started", last)
        saved.setdefault("rounds_cut_off", 0)
        if not (_is_count(saved["rounds_cut_off"]) and _is_count(saved["round_started"])
                and saved["round_started"] in (last, last + 1)):
            raise ValueError("round started or rounds cut off")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a fortify federation record; remove {out} to start "
                              "again") from None
    return saved


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
