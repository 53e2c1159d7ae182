"""The record of a federated run, and the run directory the server writes.

The directory is a fortify model directory (config.yaml, model.json, model.safetensors,
state.json), so ``fortify evaluate`` and ``fortify audit`` work on a federated model as on any
other, plus ``federated.json`` with the per-round accuracies and the clients' training metrics.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from fortify.data import Dataset
from fortify.errors import ResultsError
from fortify.federated.config import FederatedRun
from fortify.pipeline import DATA_HASH, write_json
from fortify.training import checkpoint as ckpt

RESULT_FILE = "federated.json"


@dataclass
class RoundRecord:
    """The global model after ``round`` (0 is the initial model), evaluated centrally."""

    round: int
    clean_accuracy: float
    robust_accuracy: float
    seconds: float  # since the run started


@dataclass
class FederatedResult:
    rounds: list[RoundRecord]
    train_metrics: dict[int, dict[str, float]]  # per round, weighted means over the clients
    threat: dict[str, Any]  # norm, eps, attack, steps and the number of test examples
    federation: dict[str, Any]
    objective: str
    dataset: str
    seconds: float
    # rounds started and cut off by an interruption before they finished; each counts in the epsilon
    rounds_cut_off: int = 0

    @classmethod
    def build(cls, run: FederatedRun, dataset: Dataset, rounds: list[RoundRecord],
              train_metrics: dict[int, dict[str, Any]], seconds: float, rounds_cut_off: int = 0
              ) -> FederatedResult:
        fed = run.federation
        n_test = len(dataset.test.head(fed.eval_examples))
        threat = {"norm": run.config.threat.norm, "eps": run.config.threat.eps,
                  "bounds": list(dataset.bounds), "attack": "pgd", "steps": fed.eval_steps,
                  "restarts": 1, "n_examples": n_test}
        metrics = {int(r): {k: float(v) for k, v in m.items()} for r, m in train_metrics.items()}
        return cls(rounds, metrics, threat, fed.model_dump(mode="json"), run.config.train.objective,
                   dataset.name, seconds, rounds_cut_off)

    @property
    def final(self) -> RoundRecord:
        return self.rounds[-1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_metrics"] = {str(k): v for k, v in self.train_metrics.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedResult:
        data = copy.deepcopy(data)
        data["rounds"] = [RoundRecord(**r) for r in data["rounds"]]
        data["train_metrics"] = {int(k): {name: stored_metric(v) for name, v in m.items()}
                                 for k, m in data["train_metrics"].items()}
        data.setdefault("rounds_cut_off", 0)  # a record written before interruptions were counted
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def stored_metric(value: Any) -> float:
    """A round's metric as read back from JSON: write_json stores a non-finite number as null, and
    the one a federation records is an epsilon, infinite when the clients train without noise (or
    the accountant overflows)."""
    return math.inf if value is None else float(value)


def write_run_directory(out: Path, run: FederatedRun, dataset: Dataset, model: nn.Module,
                        result: FederatedResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / "config.yaml", run.config.to_yaml())
    normalize = run.config.model.normalize and dataset.mean is not None
    write_json(out / "model.json", {
        "name": run.config.model.name or dataset.default_model, "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes, "bounds": list(dataset.bounds),
        "mean": list(dataset.mean) if normalize and dataset.mean else None,
        "std": list(dataset.std) if normalize and dataset.std else None,
        DATA_HASH: dataset.sha256()})  # evaluate and audit refuse the data file changed since
    digest = ckpt.save_weights(out / "model.safetensors", model)
    ckpt.write_state_json(out, {"finished": True, "objective": run.config.train.objective,
                                "federated": True, "sha256": {"model.safetensors": digest,
                                                              "model.json": ckpt.sha256(out / "model.json")}})
    write_json(out / RESULT_FILE, result.to_dict())


def read_result(out: Path) -> FederatedResult:
    path = Path(out) / RESULT_FILE
    try:
        return FederatedResult.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            RecursionError) as err:  # a damaged or edited file
        raise ResultsError(f"{path} is not a federated result fortify can read ({type(err).__name__}: "
                           f"{err}); run again into a fresh --out") from None
