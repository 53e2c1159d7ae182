"""``fortify sweep``: a grid of training runs from one config, and the clean-vs-robust trade-off.

The grid ranges over objective, eps, ``trades_beta``, ``mix_ratio`` and epochs (a ``sweep:`` section
of the YAML config, or flags). A setting only multiplies the runs of the objectives that read it:
``trades_beta`` the TRADES ones, ``mix_ratio`` pgd-mix; the others keep the base value once.

Each run trains into ``OUT/<run name>/`` (a normal model directory that ``fortify evaluate`` accepts)
and is then attacked with the config's ``eval`` settings; ``result.json`` marks it finished. Running
the same command again skips finished runs and resumes an interrupted one from its checkpoint. At
the end: ``sweep.csv``, ``sweep.json`` and ``tradeoff.png`` (clean against worst-case robust
accuracy, the Pareto front marked: no other run is at least as good on both and better on one).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table
from torch import nn

from fortify.config import RunConfig, config_from_dict, read_yaml_mapping
from fortify.errors import ConfigError
from fortify.pipeline import (
    Setup,
    build_training_objective,
    evaluate_model,
    new_model,
    prepare,
    provenance,
    train_model,
    write_json,
)
from fortify.tabular.run import run_threat

RESULT_JSON = "result.json"
SWEEP_VERSION = 1
# the objectives that read each method setting of the grid (fortify.training.methods)
READERS: dict[str, tuple[str, ...]] = {"trades_beta": ("trades", "awp-trades"), "mix_ratio": ("pgd-mix",)}


class SweepGrid(BaseModel):
    """The values to try; a setting left out keeps the base config's value."""

    model_config = ConfigDict(extra="forbid")

    objective: list[str] | None = Field(None, min_length=1)
    eps: list[float] | None = Field(None, min_length=1)
    trades_beta: list[float] | None = Field(None, min_length=1)
    mix_ratio: list[float] | None = Field(None, min_length=1)
    epochs: list[int] | None = Field(None, min_length=1)


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    objective: str
    eps: float
    trades_beta: float
    mix_ratio: float
    epochs: int

    @property
    def name(self) -> str:
        parts = [self.objective, f"eps{self.eps:g}"]
        if self.objective in READERS["trades_beta"]:
            parts.append(f"beta{self.trades_beta:g}")
        if self.objective in READERS["mix_ratio"]:
            parts.append(f"mix{self.mix_ratio:g}")
        return "_".join([*parts, f"ep{self.epochs}"])

    def config(self, base: RunConfig) -> RunConfig:
        train = {"objective": self.objective, "trades_beta": self.trades_beta,
                 "mix_ratio": self.mix_ratio, "epochs": self.epochs}
        return config_from_dict(base.model_dump(mode="json"),
                                {"train": train, "threat": {"eps": self.eps}})


@dataclass
class RunResult:
    name: str
    objective: str
    eps: float
    trades_beta: float
    mix_ratio: float
    epochs: int
    clean_accuracy: float
    robust_accuracy: float  # worst case over the evaluation's attacks
    attack_accuracy: dict[str, float]  # per attack (in a cascade: after that attack)
    n_examples: int
    train_seconds: float
    passes_per_epoch: float  # forward passes through the model per training example and epoch
    best_epoch: int
    status: str = "done"  # "done" when run now, "skipped" when found finished


# -- the grid ----------------------------------------------------------------------------------

def load_sweep(path: Path | None, overrides: dict[str, Any], flags: dict[str, list[Any] | None]
               ) -> tuple[RunConfig, SweepGrid]:
    """The base config (YAML minus its ``sweep:`` section, plus overrides) and the grid (flags win)."""
    raw = read_yaml_mapping(path)
    section = raw.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"the sweep section of {path} must be a mapping of setting to a list of values, "
                          f"got {section!r}")
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        grid = SweepGrid.model_validate({**section, **given})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in err.errors())
        raise ConfigError(f"invalid sweep grid: {problems}; valid settings: "
                          f"{', '.join(SweepGrid.model_fields)}") from None
    return config_from_dict(raw, overrides), grid


def expand_grid(grid: SweepGrid, base: RunConfig) -> list[RunSpec]:
    """Every combination, in grid order, without the duplicates of settings an objective ignores."""
    train = base.train
    axes = {
        "objective": grid.objective or [train.objective], "eps": grid.eps or [base.threat.eps],
        "trades_beta": grid.trades_beta or [train.trades_beta],
        "mix_ratio": grid.mix_ratio or [train.mix_ratio], "epochs": grid.epochs or [train.epochs],
    }
    specs: list[RunSpec] = []
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values))
        for key, readers in READERS.items():
            if setting["objective"] not in readers:
                setting[key] = getattr(train, key)
        spec = RunSpec(**setting)
        if spec not in specs:
            specs.append(spec)
    return specs


# -- running -----------------------------------------------------------------------------------

Log = Callable[[str], None]


def run_sweep(base: RunConfig, grid: SweepGrid, out: Path, *, device: str = "auto",
              show_progress: bool = True, log: Log = lambda _: None) -> list[RunResult]:
    """Train and attack every run not yet finished in ``out``; write the table, plot and sweep.json."""
    specs = expand_grid(grid, base)
    setup = prepare(base, device, objectives=tuple(dict.fromkeys(s.objective for s in specs)))
    setups = [_setup_for(setup, spec.config(base)) for spec in specs]  # all checked before any run
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for number, (spec, run_setup) in enumerate(zip(specs, setups), start=1):
        log(f"[{number}/{len(specs)}] {spec.name}")
        results.append(_run_one(spec, run_setup, out / spec.name, show_progress))
    write_outputs(results, out, base, grid, setup.device)
    return results


def _setup_for(setup: Setup, config: RunConfig) -> Setup:
    threat = run_threat(config.threat.norm, config.threat.eps, setup.dataset, config.data.feature_schema)
    threat.check_inputs(setup.dataset.test.x[:1])
    return dataclasses.replace(setup, config=config, threat=threat)


def _run_one(spec: RunSpec, setup: Setup, run_dir: Path, show_progress: bool) -> RunResult:
    config = setup.config.model_dump(mode="json")
    finished = run_dir / RESULT_JSON
    if finished.is_file():
        recorded = json.loads(finished.read_text())
        if recorded.get("config") != config:
            raise ConfigError(f"{run_dir} was run with other settings than this sweep's; "
                              "choose another --out or remove that run directory")
        return RunResult(**{**recorded["result"], "status": "skipped"})
    passes = count_forward_passes(setup, spec.objective)
    model, training = train_model(setup, spec.objective, run_dir, resume=True, show_progress=show_progress)
    report = evaluate_model(setup, model)
    result = RunResult(
        name=spec.name, objective=spec.objective, eps=spec.eps, trades_beta=spec.trades_beta,
        mix_ratio=spec.mix_ratio, epochs=spec.epochs, clean_accuracy=report.clean_accuracy,
        robust_accuracy=report.worst_case_accuracy,
        attack_accuracy={a.name: a.adversarial_accuracy for a in report.attacks},
        n_examples=report.n_examples, train_seconds=training.seconds, passes_per_epoch=passes,
        best_epoch=training.best_epoch)
    write_json(finished, {"config": config, "result": asdict(result), "robustness": report.to_dict()})
    return result


def count_forward_passes(setup: Setup, objective_name: str) -> float:
    """Forward passes per example of one training step, counted by a hook on a throw-away model.

    A step calls the objective ``replays`` times (Free AT), each crafting its attack and computing
    the loss; an epoch takes one step per batch, so this is also the passes per example and epoch.
    """
    cfg = setup.config.train
    model = new_model(setup, cfg.seed)
    objective = build_training_objective(setup, cfg.model_copy(update={"objective": objective_name}))
    seen = [0]

    def count(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen[0] += int(inputs[0].shape[0])

    model.register_forward_pre_hook(count)  # copies (AWP's proxy) inherit the hook and count too
    batch = setup.dataset.train.head(cfg.batch_size)
    x, y = batch.x.to(setup.device), batch.y.to(setup.device)
    model.train()
    for _ in range(objective.replays):
        loss = objective(model, x, y)
        loss.backward()
        objective.after_backward(model)
    return seen[0] / len(batch)


# -- results -----------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at least as high on both, higher on one)."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(c >= a and d >= b and (c > a or d > b) for c, d in points)
        if not dominated:
            front.append(i)
    return front


COLUMNS = ("name", "objective", "eps", "trades_beta", "mix_ratio", "epochs", "clean_accuracy",
           "robust_accuracy", "train_seconds", "passes_per_epoch", "pareto")


def table_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    front = set(pareto_front([(r.clean_accuracy, r.robust_accuracy) for r in results]))
    attacks = list(dict.fromkeys(name for r in results for name in r.attack_accuracy))
    rows = []
    for index, r in enumerate(results):
        row = {key: getattr(r, key) for key in COLUMNS if key != "pareto"}
        row |= {f"acc_{a}": r.attack_accuracy.get(a) for a in attacks}
        rows.append(row | {"pareto": index in front})
    return rows


def write_outputs(results: Sequence[RunResult], out: Path, base: RunConfig, grid: SweepGrid,
                  device: torch.device) -> None:
    rows = table_rows(results)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "sweep.json", {
        "version": SWEEP_VERSION, "config": base.model_dump(mode="json"),
        "grid": grid.model_dump(exclude_none=True), "runs": [asdict(r) for r in results],
        "pareto": [row["name"] for row in rows if row["pareto"]],
        "provenance": provenance(base, device)})
    plot_tradeoff(results, out / "tradeoff.png")


def plot_tradeoff(results: Sequence[RunResult], path: Path) -> None:
    """Clean against robust accuracy, one point per run; the Pareto front joined and ringed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    points = [(100 * r.clean_accuracy, 100 * r.robust_accuracy) for r in results]
    front = sorted(pareto_front(points), key=lambda i: points[i])
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    try:
        ax.scatter(*zip(*points), s=22, color="tab:blue", label="run")
        ax.plot(*zip(*[points[i] for i in front]), color="tab:red", marker="o", markersize=9,
                markerfacecolor="none", label="Pareto front")
        for r, (x, y) in zip(results, points):
            ax.annotate(r.name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy, worst case (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def rich_table(results: Sequence[RunResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("run", "clean", "robust", "train s", "passes/epoch", "Pareto"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in table_rows(results):
        table.add_row(row["name"], f"{100 * row['clean_accuracy']:.1f}%",
                      f"{100 * row['robust_accuracy']:.1f}%", f"{row['train_seconds']:.1f}",
                      f"{row['passes_per_epoch']:g}", "*" if row["pareto"] else "")
    return table
