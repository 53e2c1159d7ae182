"""``fortify compare``: several runs' models side by side on one page.

The runs' models are merged into one results dict (model names prefixed by their run's directory)
and rendered with the run report's template, so every section compares like with like. Runs under
different threat models are refused: their robust accuracies measure different things. Runs on
different data may stand side by side (a model on digits next to one on MNIST), but the page then
says which data settings differ, since their accuracies come from different test examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fortify.errors import ResultsError
from fortify.report.html import check_out, write_report
from fortify.report.results import RESULTS_VERSION, load_results


def _run_name(results: dict[str, Any]) -> str:
    # resolved: the directory of a relative 'results.json' (run from inside the run) has no name
    source = Path(results["source"]).resolve()
    return source.parent.name or source.stem


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One comparison results dict holding every model of ``runs`` (normalised results)."""
    if len(runs) < 2:
        raise ResultsError(f"compare needs at least two runs, got {len(runs)}")
    files = [str(Path(run["source"]).resolve()) if run.get("source") else None for run in runs]
    repeated = next((run["source"] for run, file in zip(runs, files) if file and files.count(file) > 1), None)
    if repeated is not None:  # its models would stand beside themselves as if they were others
        raise ResultsError(f"{repeated} is given twice; compare different runs")
    reference = runs[0]
    for run in runs[1:]:
        if run["threat"] != reference["threat"]:
            raise ResultsError(
                f"{run['source']} was measured under {_describe(run['threat'])} but {reference['source']} "
                f"under {_describe(reference['threat'])}; compare runs with the same threat model")
    prefixes = _run_prefixes(runs)
    models = {f"{prefix}/{model_name}": model
              for prefix, run in zip(prefixes, runs) for model_name, model in run["models"].items()}
    datasets = sorted({run["dataset"]["name"] for run in runs})
    notes = _data_differences(runs, prefixes)
    # per-class figures name the classes only where every run names them alike
    names = reference["dataset"].get("class_names")
    agreed = all(run["dataset"].get("class_names") == names for run in runs)
    shared_names = {"class_names": names} if names and agreed else {}
    return {"version": RESULTS_VERSION, "kind": "comparison", "threat": reference["threat"],
            "dataset": {"name": " vs ".join(datasets), **shared_names}, "models": models,
            "provenance": {prefix: _provenance_line(run) for prefix, run in zip(prefixes, runs)},
            "config": None, **({"notes": notes} if notes else {}),
            "sources": [run["source"] for run in runs]}  # write_report never writes over one of them


# the data settings that decide which examples a run was evaluated on; where the data are cached and
# whether they may be downloaded decide nothing
_TEST_SET_SETTINGS = ("name", "path", "seed", "val_fraction", "test_fraction", "target", "feature_schema")


def _data_differences(runs: list[dict[str, Any]], prefixes: list[str]) -> list[str]:
    """One line per data setting that differs between the runs (none where they agree, or where a
    run records no configuration, as a saved comparison does not)."""
    settings = [_data_settings(run) for run in runs]
    if any(setting is None for setting in settings):
        return []
    lines = []
    for key in _TEST_SET_SETTINGS:
        values = [setting.get(key) for setting in settings]  # type: ignore[union-attr]
        if any(value != values[0] for value in values[1:]):
            shown = ", ".join(f"{prefix} {value!r}" for prefix, value in zip(prefixes, values))
            lines.append(f"the runs differ in data.{key} ({shown}): their accuracies come from "
                         "different test examples")
    return lines


def _data_settings(run: dict[str, Any]) -> dict[str, Any] | None:
    config = run.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else None


def _run_prefixes(runs: list[dict[str, Any]]) -> list[str]:
    """Each run's name on the page: its directory, numbered ('run#2') where two runs share one.

    The model names and the provenance table both use it, so each run keeps its own entry. A number
    already taken (a third run whose directory is called 'run#2') is skipped: two runs under one
    name would have the later's models silently replace the earlier's.
    """
    names = [_run_name(run) for run in runs]
    taken = {name for name in names if names.count(name) == 1}  # these keep their plain name
    prefixes = []
    for index, name in enumerate(names):
        prefix = name if names.count(name) == 1 else _unused(name, index + 1, taken)
        taken.add(prefix)
        prefixes.append(prefix)
    return prefixes


def _unused(name: str, number: int, taken: set[str]) -> str:
    """``name#number``, counting up from ``number`` past the names already taken."""
    while f"{name}#{number}" in taken:
        number += 1
    return f"{name}#{number}"


def _describe(threat: dict[str, Any]) -> str:
    # every digit: eps 0.2 and 0.2000001 are refused as different, so the message must show they differ
    described = f"{threat['norm']} eps={threat['eps']!r} box {threat['bounds']}"
    constraints = threat.get("constraints")
    return f"{described}, {constraints['description']}" if constraints else described


def _provenance_line(run: dict[str, Any]) -> str:
    p = run.get("provenance", {})
    return (f"{run['source']}: fortify {p.get('fortify_version', '?')}, torch {p.get('torch_version', '?')}, "
            f"{p.get('device', '?')}, seed {p.get('seed', '?')}, commit {p.get('git_commit') or '?'}, "
            f"{p.get('time', '?')}")


def write_comparison(run_dirs: list[Path], path: Path) -> dict[str, Any]:
    check_out(path, [])  # a wrong --out is refused before the runs are read
    merged = merge_runs([load_results(run_dir) for run_dir in run_dirs])
    write_report(merged, path)
    return merged
