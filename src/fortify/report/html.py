"""The run report: one self-contained HTML page rendered from results.json's content alone.

Figures are PNG data URIs and the styles are inline, so the page needs no network and no other
file. A section whose numbers are missing from the results (an older results version, a run that
skipped a stage) is replaced by a note saying what is missing; one figure that fails to draw does
not stop the rest of the page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

from fortify.errors import ConfigError
from fortify.report import plots, tables
from fortify.training.checkpoint import atomic_write_text

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("fortify.report", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _distance(value: float | None) -> str:
    """A quartile of minimal adversarial distances: null in the results is inf, a quartile among the
    examples for which no adversarial point was found (docs/METRICS.md), not a missing value."""
    return "\u221e" if value is None or value == math.inf else _num(value)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _epsilon(value: float | None, noise_multiplier: float | None) -> str:
    """A DP accountant's epsilon: infinite without noise, which the results file holds as null."""
    if value is None and noise_multiplier == 0:
        return "\u221e (no noise)"
    return _num(value)


def _compact(value: Any) -> str:
    """Evidence dicts as one short JSON line, floats rounded for reading to 4 significant digits
    (a p-value of 3.7e-09 or a step of 2.5e-05 would be 0.0 at 4 decimals)."""
    def rounded(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return v
    return json.dumps(rounded(value))


class _Figures:
    """Draws figures, turning a failure into a note instead of a broken page."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def draw(self, title: str, draw: Callable[..., str | None], *args: Any) -> str | None:
        try:
            return draw(*args)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, ArithmeticError) as err:
            self.notes.append(f"figure '{title}' could not be drawn from the results: "
                              f"{type(err).__name__}: {err}")
            return None


def summary_lines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per model: robust accuracy, masking, leakage, in words and numbers."""
    lines = []
    threat = results["threat"]
    for name, model in results["models"].items():
        rob = model["robustness"]
        analysis, privacy = model.get("analysis"), model.get("privacy")
        masking = analysis["masking"] if analysis else None
        strongest = (max(privacy["membership"], key=lambda r: r["auc"])
                     if privacy and privacy.get("membership") else None)
        lines.append({
            "name": name, "clean": rob["clean_accuracy"], "robust": rob["worst_case_accuracy"],
            "n_attacks": len(rob["attacks"]), "threat": describe_threat(threat),
            "harmonic": analysis["score"]["harmonic_mean"] if analysis else None,
            "masked": None if masking is None else masking["masked"],
            # checks that ran to no verdict (MaskingVerdict.not_judged) are not absent checks
            "masking_not_judged": masking is not None and masking["masked"] is None,
            "failed_checks": [c["name"] for c in masking["checks"] if not c["passed"]] if masking else [],
            "n_checks": len(masking["checks"]) if masking else 0,
            "membership_auc": strongest["auc"] if strongest else None,
            "membership_attack": strongest["attack"] if strongest else None,
        })
    return lines


def _figures(results: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    models, threat = results["models"], results["threat"]
    class_names = results["dataset"].get("class_names")  # a comparison's only where its runs agree
    figures = _Figures()
    shared = {
        "eps": figures.draw("accuracy versus eps", plots.eps_curves, models, threat["norm"], threat["eps"]),
        "margin": figures.draw("robust margin", plots.margin_distributions, models),
        "certified": figures.draw("certified accuracy", plots.certified_curves, models),
        "radius_vs_margin": figures.draw("radius versus margin", plots.radius_vs_margin, models),
        "confidence": figures.draw("entropy and margin", plots.confidence_shift, models),
        "roc": figures.draw("membership ROC", plots.membership_roc, models),
        "tradeoff": figures.draw("robustness-privacy trade-off", plots.privacy_tradeoff, models),
    }
    per_model: dict[str, dict[str, str | None]] = {}
    for name, model in models.items():
        analysis = model.get("analysis")
        if not analysis:
            continue
        classes = analysis["metrics"]["classes"]
        per_model[name] = {
            "f1": figures.draw(f"{name} per-class F1", plots.class_f1, name, classes, class_names),
            "confusion": figures.draw(f"{name} confusion", plots.confusion, name, classes, class_names),
            "gallery": figures.draw(f"{name} gallery", plots.gallery, name, analysis["gallery"],
                                    threat["bounds"]),
        }
    for name, model in models.items():
        if model.get("tabular"):
            per_model.setdefault(name, {})["features"] = figures.draw(
                f"{name} feature changes", plots.feature_changes, name, model["tabular"]["feature_changes"])
    return {"shared": shared, "models": per_model}, figures.notes


def describe_threat(threat: dict[str, Any]) -> str:
    """``linf eps=0.2``, or a constrained threat model's own description (which features move)."""
    constraints = threat.get("constraints")
    return constraints["description"] if constraints else f"{threat['norm']} eps={threat['eps']:.4g}"


def _missing_sections(results: dict[str, Any]) -> list[str]:
    notes = []
    for name, model in results["models"].items():
        if not model.get("analysis"):
            # neutral on the writer: `fortify run` with the analysis switched off and `fortify evaluate`
            # without --report both leave it out
            notes.append(f"{name}: no analysis in the results (robust margin, certified radius, entropy, "
                         "per-class metrics, gallery and gradient-masking checks are left out); the "
                         "command that wrote them did not run it")
        if not model.get("privacy"):
            notes.append(f"{name}: no privacy audit in the results (membership inference left out)")
    return notes


def table_data(models: dict[str, Any]) -> dict[str, Any]:
    """What the page's tables over several models read, keyed by attack and eps (see tables)."""
    attack_names, attack_accuracy = tables.attack_accuracy(models)
    analysed = [name for name, m in models.items() if m.get("analysis")]
    margin_eps, margin_shares = tables.margin_shares(models, analysed)
    examples = tables.example_counts(models)
    return {"attack_names": attack_names, "attack_accuracy": attack_accuracy,
            "eps_rows": tables.eps_curve_rows(models), "curve_attacks": tables.eps_curve_attacks(models),
            "margin_eps": margin_eps, "margin_shares": margin_shares,
            "attack_settings": tables.attack_settings(models), "examples": examples,
            "cascade": tables.has_cascade(models),
            # one count for the page when every model saw the same examples, else a column per model
            "n_examples": next(iter(examples.values())) if len(set(map(str, examples.values()))) == 1
            else None}


def render_report(results: dict[str, Any]) -> str:
    """HTML for a run's results (the normalised dict of ``fortify.report.results.load_results``)."""
    models = results["models"]
    figures, figure_notes = _figures(results)
    return _ENV.get_template("report.html").render(
        dataset=results["dataset"], threat=results["threat"], models=models, **table_data(models),
        summary=summary_lines(results), figures=figures,
        missing=list(results.get("notes", [])) + _missing_sections(results) + figure_notes,
        provenance=results.get("provenance", {}), config=results.get("config"),
        pct=_pct, num=_num, distance=_distance, seconds=_seconds, epsilon=_epsilon, compact=_compact,
        pretty=lambda value: json.dumps(value, indent=2))


def check_out(path: Path, sources: list[str]) -> None:
    """Refuse an output the page must not be written to: anything but an .html file, and above all
    a results file the page is drawn from (replacing it with HTML would lose the run's results)."""
    path = Path(path)
    if path.suffix.lower() != ".html":
        raise ConfigError(f"the report is an HTML page: write it to a .html file, not {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the path of the .html file to write")
    for source in map(Path, sources):
        if _same_file(path, source):
            raise ConfigError(f"{path} is the results file the report is drawn from; choose another file")


def _same_file(a: Path, b: Path) -> bool:
    """Through symbolic links (resolve) and hard links (samefile, for files that exist)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def _results_files(results: dict[str, Any]) -> list[str]:
    """The files ``results`` was read from: its own, or the runs a comparison merged."""
    return [results["source"]] if results.get("source") else list(results.get("sources", []))


def write_report(results: dict[str, Any], path: Path) -> Path:
    """Render and write the page; the parent directories are created, as for other outputs."""
    path = Path(path)
    check_out(path, _results_files(results))
    page = render_report(results)  # rendered first: a failure leaves nothing behind
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)  # UTF-8, as the page declares
    return path
