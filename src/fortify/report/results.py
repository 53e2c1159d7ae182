"""Reading what a run wrote: results.json (``fortify run``), robustness.json (``fortify evaluate``) or
result.json (one run of ``fortify sweep``, read as an evaluation).

Both are normalised to one shape, ``{"models": {name: {"robustness": ..., ...}}, ...}``, so the
report and the comparison read one layout. Problems are ResultsErrors that name the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fortify.errors import ResultsError
from fortify.report import schema

RESULTS_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks the analysis and privacy sections; the report says so
RESULT_FILES = ("results.json", "robustness.json", "result.json")
_RESULT_FILES_READ = ("the results are a run's results.json, a model's robustness.json or a sweep run's "
                      "result.json (or the directory that holds one)")
SWEEP_RESULT_KEYS = ("config", "result", "robustness")  # a sweep run's result.json has no version


def find_results(run_dir: Path) -> Path:
    """The results file of a run or model directory (or the file itself)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.exists():
        raise ResultsError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir} is neither a results file nor a directory")
    for name in RESULT_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ResultsError(f"{run_dir} holds no results ({' or '.join(RESULT_FILES)} missing); "
                       f"{_how_to_get_results(run_dir)}")


def _how_to_get_results(directory: Path) -> str:
    """What gives ``directory`` its results, by what it holds: a sweep's runs each have their own, a
    model directory is evaluated, an unfinished run is resumed."""
    if (directory / "sweep.json").is_file() or (directory / "sweep.csv").is_file():
        runs = sorted(p.parent.name for p in directory.glob("*/result.json"))
        more = ", ..." if len(runs) > 5 else ""
        named = f" (its finished runs: {', '.join(runs[:5])}{more})" if runs else ""
        return (f"it is a sweep directory, summarised in sweep.csv and tradeoff.png: give one of its runs, "
                f"{directory}/RUN{named}")
    if (directory / "model.json").is_file():
        return f"it holds a trained model: evaluate it with `fortify evaluate {directory}` first"
    if (directory / "config.yaml").is_file():
        return (f"if it is a run cut off before its results, finish it with "
                f"`fortify run --resume --out {directory}`")
    return "it holds nothing fortify wrote: give a run or model directory, or a results file"


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read and normalise a run's results; never unpickles, only parses JSON."""
    path = find_results(run_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        if path.suffix != ".json":  # a config file or a page given in place of the results, say
            raise ResultsError(f"{path} is not a results file (not JSON): {_RESULT_FILES_READ}") from None
        raise ResultsError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); it may have "
                           "been cut off: rerun the command that wrote it") from None
    except RecursionError:
        raise ResultsError(f"{path} nests its values deeper than a results file does") from None
    except ValueError as err:  # a number longer than Python reads (4,300 digits)
        raise ResultsError(f"{path} is not a results file fortify wrote ({err})") from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    if "version" not in raw and all(key in raw for key in SWEEP_RESULT_KEYS):
        raw = {"version": RESULTS_VERSION, "kind": "evaluation", "config": raw["config"],
               "robustness": raw["robustness"]}
    version = raw.get("version")
    if "kind" not in raw:  # a model card, a training state, a federation's or a sweep's summary
        raise ResultsError(f"{path} is not a results file: {_RESULT_FILES_READ}")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:  # true == 1 in Python
        raise ResultsError(f"{path} has results version {version!r}; this fortify reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    results = _normalise(raw, path)
    results["source"] = str(path)
    return results


def _normalise(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    kind = raw.get("kind")
    if kind == "comparison":
        _require(raw, ("models", "threat", "dataset"), path)
        if not isinstance(raw["models"], dict) or not raw["models"]:
            raise ResultsError(f"{path} lists no models")
        _check_fields(raw, schema.COMPARISON, path)
        return dict(raw)
    if kind == "evaluation":
        _require(raw, ("robustness", "config"), path)
        _check_fields(raw, schema.EVALUATION, path)
        name = path.resolve().parent.name or "model"  # resolved: a relative path's '.' has no name
        model = {key: raw[key] for key in ("robustness", "analysis", "privacy", "tabular") if key in raw}
        training = _json_beside(path, "training.json", schema.TRAINING)
        if training is not None:
            model["training"] = training
        if "privacy" not in model:  # `fortify audit` writes its own file into the model directory
            audit = _json_beside(path, "privacy.json", schema.PRIVACY_FILE)
            if audit is not None:
                model["privacy"] = audit["privacy"]
        data = raw["config"].get("data", {})
        named = raw.get("dataset") or {}  # absent in files written before it was recorded
        dataset = {"name": data.get("name", "?"),
                   **{key: named[key] for key in ("class_names", "inputs_also_in_train") if key in named}}
        return {"version": raw["version"], "kind": kind, "config": raw["config"],
                "dataset": dataset, "threat": raw["robustness"]["threat"],
                "models": {name: model}, "provenance": raw.get("provenance", {})}
    raise ResultsError(f"{path} is of kind {kind!r}; the report reads 'comparison' (fortify run) and "
                       "'evaluation' (fortify evaluate) results")


def _json_beside(path: Path, name: str, spec: schema.Check) -> dict[str, Any] | None:
    """The file ``name`` of the model directory (training.json of ``fortify train``, privacy.json of
    ``fortify audit``), checked against ``spec``; None where there is none."""
    beside = path.parent / name
    if not beside.is_file():
        return None
    try:
        loaded = json.loads(beside.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ResultsError(f"cannot read {beside}: {err}") from None
    if not isinstance(loaded, dict):
        return None
    _check_fields(loaded, spec, beside)
    version = loaded.get("version")
    if "version" in loaded and (isinstance(version, bool) or version not in READABLE_VERSIONS):
        raise ResultsError(f"{beside} has results version {version!r}; this fortify reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    return loaded


def _require(raw: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if key not in raw]
    if missing:
        raise ResultsError(f"{path} lacks {', '.join(missing)}; it is not a complete fortify results file")


def _check_fields(raw: dict[str, Any], spec: schema.Check, path: Path) -> None:
    """The fields the report reads have the types it formats them as (else one error, not a crash)."""
    try:
        schema.check(raw, spec)
    except schema.Mismatch as err:
        raise ResultsError(f"{path}: {err}") from None
