"""``fortify sweep``: a grid of training runs from one config, and the clean-vs-robust trade-off.

The grid ranges over objective, eps, ``trades_beta``, ``mix_ratio`` and epochs (a ``sweep:`` section
of the YAML config, or flags). A setting only multiplies the runs of the objectives that read it:
``trades_beta`` the TRADES ones, ``mix_ratio`` pgd-mix; the others keep the base value once.

Each run trains into ``OUT/<run name>/`` (a normal model directory that ``fortify evaluate`` accepts)
and is then attacked with the config's ``eval`` settings; ``result.json`` marks it finished. Running
the same command again skips finished runs and resumes an interrupted one from its checkpoint. At
the end: ``sweep.csv``, ``sweep.json`` and ``tradeoff.png`` (clean against worst-case robust
accuracy, the Pareto front marked: no other run is at least as good on both and better on one).

The summary covers the whole directory, not only this invocation's grid: a finished run outside the
grid that the same base settings made is kept in it, so rerunning with a smaller or another grid adds
to the table instead of cutting it; finished runs made with other base settings are left out (and
named). Every run directory already in ``OUT`` is read before any run starts: a damaged
``result.json`` or ``state.json``, or a run made with other settings, stops the sweep with an error
then, not hours later when its turn comes.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from rich.table import Table
from torch import nn

from fortify.config import (
    RunConfig,
    comparable_settings,
    config_from_dict,
    listed,
    read_yaml_mapping,
    setting_differences,
)
from fortify.errors import CheckpointError, ConfigError, ResultsError
from fortify.models.modes import value_preserving
from fortify.pipeline import (
    SWEEP_SUMMARY,
    UNFINISHED_CONFIG,
    Setup,
    build_training_objective,
    check_data_unchanged,
    check_directory_kind,
    check_same_settings,
    directory_kind,
    discarded_on_error,
    evaluate_model,
    new_model,
    prepare,
    prepare_training,
    provenance,
    train_model,
    write_json,
)
from fortify.report.tables import attack_key
from fortify.tabular.run import run_threat
from fortify.training import checkpoint as ckpt

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

    @field_validator("eps", "trades_beta", "mix_ratio", "epochs", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, values: Any) -> Any:
        # pydantic would read YAML's `epochs: [true]` as [1]
        if isinstance(values, list) and any(isinstance(v, bool) for v in values):
            raise ValueError("numbers are expected, not true or false")
        return values

    @field_validator("*")
    @classmethod
    def _each_value_once(cls, values: list[Any] | None) -> list[Any] | None:
        # a repeated value would make the same run twice; expand_grid would drop it without a word
        if values is None:
            return None
        repeated = [value for index, value in enumerate(values) if value in values[:index]]
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice; list each value once")
        return values


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


# read back from result.json and printed as percentages: 7.0 or NaN in an edited file would show as such
_Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


@dataclass
class RunResult:
    name: str
    objective: str
    eps: float
    trades_beta: float
    mix_ratio: float
    epochs: int
    clean_accuracy: _Fraction
    robust_accuracy: _Fraction  # worst case over the evaluation's attacks
    attack_accuracy: dict[str, _Fraction]  # per attack (in a cascade: after that attack)
    n_examples: int
    train_seconds: float
    passes_per_epoch: float  # forward passes through the model per training example and epoch
    best_epoch: int
    # "done" when run now, "skipped" when found finished, "kept" when found finished outside the grid
    status: str = "done"


_RESULT_ADAPTER = TypeAdapter(RunResult)


# -- the grid ----------------------------------------------------------------------------------

def parse_grid_values(text: str | None, flag: str, kind: type) -> list[Any] | None:
    """A comma-separated flag value as a list of ``kind``; None when the flag was not given.

    An empty item (``0.1,,0.2``, a trailing comma) or a value given twice is refused, not dropped:
    either is a typo, and dropping it would run another grid than the one typed.
    """
    if text is None:
        return None
    values: list[Any] = []
    for position, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            raise ConfigError(f"{flag} {text!r} has an empty item at position {position + 1}; "
                              "give comma-separated values without empty items")
        try:
            value = kind(item)
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated {kind.__name__} values, got {item!r} "
                              f"in {text!r}") from None
        if value in values:
            raise ConfigError(f"{flag} {text!r} lists {item!r} twice; list each value once")
        values.append(value)
    return values


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
        raise ConfigError(f"invalid sweep grid: {_grid_problems(err)}") from None
    return config_from_dict(raw, overrides), grid


def _grid_problems(err: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg'].removeprefix('Value error, ')}"
                         for p in err.errors())
    if any(p["type"] == "extra_forbidden" for p in err.errors()):
        problems += f"; valid settings: {', '.join(SweepGrid.model_fields)}"
    return problems


def expand_grid(grid: SweepGrid, base: RunConfig) -> list[RunSpec]:
    """Every combination, in grid order, without the duplicates of settings an objective ignores."""
    train = base.train
    axes = {
        "objective": grid.objective or [train.objective], "eps": grid.eps or [base.threat.eps],
        "trades_beta": grid.trades_beta or [train.trades_beta],
        "mix_ratio": grid.mix_ratio or [train.mix_ratio], "epochs": grid.epochs or [train.epochs],
    }
    for key, readers in READERS.items():
        if getattr(grid, key) and not set(axes["objective"]) & set(readers):
            raise ConfigError(f"the grid sets {key} = {getattr(grid, key)}, which only {', '.join(readers)} "
                              f"read{'s' if len(readers) == 1 else ''}; none of the objectives "
                              f"{axes['objective']} does: add one of them, or drop {key}")
    specs: list[RunSpec] = []
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values))
        for key, readers in READERS.items():
            if setting["objective"] not in readers:
                setting[key] = getattr(train, key)
        spec = RunSpec(**setting)
        if spec not in specs:
            specs.append(spec)
    _check_names_apart(specs)
    return specs


def _check_names_apart(specs: list[RunSpec]) -> None:
    """Run directories are named with 6 significant digits: settings that agree in those would share
    one directory, and the second would refuse to continue the first, on every rerun."""
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.name, spec)
        if other is not spec:
            raise ConfigError(f"the grid points {asdict(other)} and {asdict(spec)} would share the run "
                              f"directory {spec.name!r}; give values that differ within 6 significant "
                              "digits")


# -- running -----------------------------------------------------------------------------------

Log = Callable[[str], None]


def run_sweep(base: RunConfig, grid: SweepGrid, out: Path, *, device: str = "auto",
              show_progress: bool = True, log: Log = lambda _: None) -> list[RunResult]:
    """Train and attack every run not yet finished in ``out``; write the table, plot and sweep.json.

    Returns (and summarises) the grid's runs in grid order, then the directory's other finished runs
    of the same base settings (finished_runs_outside).
    """
    check_sweep_directory(out)
    specs = expand_grid(grid, base)
    setup = prepare(base, device, objectives=tuple(dict.fromkeys(s.objective for s in specs)))
    setups = [_setup_for(setup, spec.config(base)) for spec in specs]  # all checked before any run
    # the run directories already there too: a damaged one stops the sweep now, not when its turn comes
    found = [finished_result(out / spec.name, run_setup.config) for spec, run_setup in zip(specs, setups)]
    kept = finished_runs_outside(out, specs, base, log)
    # runs of these settings, checked to be of these data as well: a data file changed since would
    # put numbers of two datasets in one table (every run's data are the base's, split alike)
    for name in [spec.name for spec in specs] + [result.name for result in kept]:
        check_data_unchanged(out / name, setup)
    for spec, run_setup, finished in zip(specs, setups, found):  # what train would refuse, refused now
        if finished is None:
            prepare_training(run_setup, spec.objective, out / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for number, (spec, run_setup, finished) in enumerate(zip(specs, setups, found), start=1):
        log(f"[{number}/{len(specs)}] {spec.name}" + (" (finished)" if finished else ""))
        results.append(finished or _run_one(spec, run_setup, out / spec.name, show_progress))
    write_outputs(results + kept, out, base, grid, setup.device)
    return results + kept


def check_sweep_directory(out: Path) -> None:
    """A sweep writes into a new or empty directory, or continues one of its own: one that holds its
    summary (sweep.json, sweep.csv or tradeoff.png), or, cut off before its first summary, nothing but
    run directories (each a train directory, with or without its result.json, or empty when cut off
    at its start). Anything else is someone else's, and a sweep would train its runs over it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out names a directory")
    if not out.is_dir():
        return
    check_directory_kind(out, "sweep", "cannot continue a sweep")
    if directory_kind(out) == "sweep":  # its summary is there: files put beside it are the user's
        return
    foreign = [entry.name for entry in sorted(out.iterdir()) if not _written_by_a_sweep(entry)]
    if foreign:
        raise ConfigError(f"{out} holds {foreign[0]!r}, which a sweep does not write, so it is not a "
                          "sweep directory to continue; choose another --out")


def _written_by_a_sweep(entry: Path) -> bool:
    if entry.name.startswith("."):  # a file manager's or a version control's, not content
        return True
    if entry.is_file():
        return entry.name.removesuffix(".tmp") in SWEEP_SUMMARY  # .tmp: cut off while it was written
    # a run's directory: empty or holding the config alone half-written if it was cut off at once
    return entry.is_dir() and (all(item.name == UNFINISHED_CONFIG for item in entry.iterdir()) or any(
        (entry / name).is_file() for name in ("config.yaml", ckpt.STATE_JSON, RESULT_JSON)))


def _setup_for(setup: Setup, config: RunConfig) -> Setup:
    threat = run_threat(config.threat.norm, config.threat.eps, setup.dataset, config.data.feature_schema)
    threat.check_inputs(setup.dataset.test.x[:1])
    return dataclasses.replace(setup, config=config, threat=threat)


def _run_one(spec: RunSpec, setup: Setup, run_dir: Path, show_progress: bool) -> RunResult:
    config = setup.config.model_dump(mode="json")
    passes = count_forward_passes(setup, spec.objective)
    # a run that fails before its first checkpoint takes back what it wrote, as train and run do
    with discarded_on_error(run_dir):
        model, training = train_model(setup, spec.objective, run_dir, resume=True,
                                      show_progress=show_progress)
    report = evaluate_model(setup, model)
    result = RunResult(
        name=spec.name, objective=spec.objective, eps=spec.eps, trades_beta=spec.trades_beta,
        mix_ratio=spec.mix_ratio, epochs=spec.epochs, clean_accuracy=report.clean_accuracy,
        robust_accuracy=report.worst_case_accuracy,
        # a cascade's accuracy is cumulative: its column says so, as the report's does
        attack_accuracy={attack_key({"name": a.name, "mode": a.mode}): a.adversarial_accuracy
                         for a in report.attacks},
        n_examples=report.n_examples, train_seconds=training.seconds, passes_per_epoch=passes,
        best_epoch=training.best_epoch)
    write_json(run_dir / RESULT_JSON, {"config": config, "result": asdict(result),
                                       "robustness": report.to_dict()})
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
    # An unmarked hook would make the model count as mode-dependent (fortify.models.modes), and fgsm
    # and TRADES would then take a pass more than they do in training. A global hook counts the
    # passes of the modules marked here, copies (AWP's proxy) included, since a copy keeps the mark
    model.__dict__[_COUNTED] = True

    @value_preserving
    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.__dict__.get(_COUNTED):
            seen[0] += int(inputs[0].shape[0])

    handle = nn.modules.module.register_module_forward_pre_hook(count)
    batch = setup.dataset.train.head(cfg.batch_size)
    x, y = batch.x.to(setup.device), batch.y.to(setup.device)
    model.train()
    try:
        for _ in range(objective.replays):
            loss = objective(model, x, y)
            loss.backward()
            objective.after_backward(model)
    finally:
        handle.remove()
    return seen[0] / len(batch)


_COUNTED = "_counted_by_sweep"  # the mark of the throw-away model whose passes count_forward_passes counts


# -- the run directories already in OUT --------------------------------------------------------

def finished_result(run_dir: Path, config: RunConfig) -> RunResult | None:
    """The result of the run in ``run_dir`` if it finished with ``config``; None for one to train or
    resume. A damaged file or other settings are an error."""
    if (run_dir / ckpt.STATE_JSON).is_file():
        _check_state_json(run_dir)
    elif (run_dir / RESULT_JSON).is_file():  # the model directory is incomplete: evaluate cannot load it
        raise CheckpointError(f"{run_dir} has a {RESULT_JSON} but no {ckpt.STATE_JSON}; remove {run_dir} "
                              "to train that run again")
    if not (run_dir / RESULT_JSON).is_file():
        check_same_settings(run_dir, config)  # what resuming it would check, only later
        return None
    recorded = read_recorded(run_dir)
    differing = setting_differences(_sweep_settings(recorded["config"]),
                                    _sweep_settings(config.model_dump(mode="json")))
    if differing and all(item.startswith("eval.") for item in differing):
        # the trained model is kept: only its attacks need running again
        raise ConfigError(f"{run_dir} was attacked with other settings than this sweep's: "
                          f"{listed(differing)}; remove {run_dir / RESULT_JSON} to attack its model again "
                          "under these, or choose another --out")
    if differing:
        raise ConfigError(f"{run_dir} was run with other settings than this sweep's: {listed(differing)}; "
                          "choose another --out or remove that run directory")
    return dataclasses.replace(recorded_result(run_dir, recorded), status="skipped")


def _check_state_json(run_dir: Path) -> None:
    # read as resuming or `fortify evaluate` would read it: a truncated one is useless to both
    try:
        ckpt.read_state_json(run_dir)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; remove {run_dir} to train that run again") from None


def read_recorded(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``result.json``, checked to hold the config the run was made with.

    A damaged one is an error rather than a run to redo: result.json is written atomically, so a killed
    sweep does not leave a partial one; a damaged file was changed afterwards, which the user should know
    of before the sweep writes over it. Deleting it has the run's trained model attacked again.
    """
    path = run_dir / RESULT_JSON
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or a number past 4,300 digits
        raise _damaged(run_dir, f"not valid JSON: {err}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise _damaged(run_dir, "it holds no config")
    return recorded


def recorded_result(run_dir: Path, recorded: dict[str, Any]) -> RunResult:
    """The result part of a ``result.json`` as read by read_recorded, checked field by field."""
    try:
        return _RESULT_ADAPTER.validate_python(recorded.get("result"))
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(map(str, ("result", *problem["loc"])))
        raise _damaged(run_dir, f"{where}: {problem['msg']}") from None


def _damaged(run_dir: Path, why: str) -> ResultsError:
    return ResultsError(f"{run_dir / RESULT_JSON} is not a readable sweep result ({why}); delete it to "
                        "have the sweep attack that run again (its trained model is kept)")


def finished_runs_outside(out: Path, specs: Sequence[RunSpec], base: RunConfig, log: Log) -> list[RunResult]:
    """The finished runs in ``out`` that the grid does not name but the same base settings made, by name.

    The summary keeps them: sweep.csv and sweep.json describe the directory, and a rerun with a
    smaller grid must not drop runs that stay on disk. Runs made with other base settings would not
    be comparable; they are left out and named.
    """
    in_grid = {spec.name for spec in specs}
    kept, other = [], []
    for path in sorted(out.glob(f"*/{RESULT_JSON}")):
        if path.parent.name in in_grid:
            continue
        recorded = read_recorded(path.parent)
        result = recorded_result(path.parent, recorded)
        if _made_with(base, path.parent.name, recorded["config"], result):
            kept.append(dataclasses.replace(result, status="kept"))
        else:
            other.append(path.parent.name)
    if kept:
        log(f"{len(kept)} finished run(s) in {out} outside this grid stay in the summary")
    if other:
        log(f"left out of the summary, made with other settings: {', '.join(other)}")
    return kept


def _made_with(base: RunConfig, name: str, config: dict[str, Any], result: RunResult) -> bool:
    """Whether this sweep's base settings make the run ``name`` with exactly ``config``."""
    spec = RunSpec(result.objective, result.eps, result.trades_beta, result.mix_ratio, result.epochs)
    try:
        expected = spec.config(base).model_dump(mode="json")
    except ConfigError:  # a grid value these base settings do not allow
        return False
    return spec.name == name and _sweep_settings(expected) == _sweep_settings(config)


def _sweep_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a sweep's results depend on: a sweep trains and evaluates but runs no analysis,
    so its ``analysis`` section changes nothing and is not compared."""
    return {section: values for section, values in comparable_settings(settings).items()
            if section != "analysis"}


# -- results -----------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at least as high on both, higher on one)."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(c >= a and d >= b and (c > a or d > b) for c, d in points)
        if not dominated:
            front.append(i)
    return front


def pareto_fronts(results: Sequence[RunResult]) -> dict[float, list[int]]:
    """Per eps, the indices of the runs on that eps's Pareto front (clean against robust accuracy).

    Each run's robust accuracy is measured at its own eps, and a smaller ball is easier to hold:
    runs of different eps are not on one scale, so each eps has a front of its own.
    """
    groups: dict[float, list[int]] = {}
    for index, r in enumerate(results):
        groups.setdefault(r.eps, []).append(index)
    return {eps: [members[i] for i in pareto_front([(results[j].clean_accuracy, results[j].robust_accuracy)
                                                     for j in members])]
            for eps, members in groups.items()}


COLUMNS = ("name", "objective", "eps", "trades_beta", "mix_ratio", "epochs", "clean_accuracy",
           "robust_accuracy", "n_examples", "train_seconds", "passes_per_epoch", "pareto")


def table_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    front = {i for members in pareto_fronts(results).values() for i in members}
    attacks = list(dict.fromkeys(name for r in results for name in r.attack_accuracy))
    rows = []
    for index, r in enumerate(results):
        row = {key: getattr(r, key) for key in COLUMNS if key != "pareto"}
        row |= {f"acc_{a}": r.attack_accuracy.get(a) for a in attacks}
        rows.append(row | {"pareto": index in front})
    return rows


def write_outputs(results: Sequence[RunResult], out: Path, base: RunConfig, grid: SweepGrid,
                  device: torch.device) -> None:
    # each accuracy with its threat model's norm and the examples it counts (eps and the attacks'
    # steps are in the columns already)
    rows = [{"norm": base.threat.norm, **row} for row in table_rows(results)]
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
    import numpy as np

    points = [(100 * r.clean_accuracy, 100 * r.robust_accuracy) for r in results]
    fronts = pareto_fronts(results)
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    try:
        ax.scatter(*zip(*points), s=22, color="tab:blue", label="run")
        # tab10 past the runs' blue has 7 colours; more fronts take theirs from a sequential map, in
        # eps order (zip would drop the fronts beyond the 7th)
        colours = plt.get_cmap("tab10").colors[3:]
        if len(fronts) > len(colours):
            colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(fronts)))
        for (eps, members), colour in zip(sorted(fronts.items()), colours):
            front = sorted(members, key=lambda i: points[i])
            label = "Pareto front" if len(fronts) == 1 else f"Pareto front, eps {eps:g}"
            ax.plot(*zip(*[points[i] for i in front]), color=colour, marker="o", markersize=9,
                    markerfacecolor="none", label=label)
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
