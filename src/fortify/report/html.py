"""The run report: one self-contained HTML page rendered from results.json's content alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("fortify.report", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render_report(results: dict[str, Any]) -> str:
    """HTML for a comparison run's results (the dict written to results.json)."""
    models = results["models"]
    first = next(iter(models.values()))
    return _ENV.get_template("report.html").render(
        dataset=results["dataset"], threat=results["threat"], models=models, first_model=first,
        n_examples=first["robustness"]["n_examples"],
        attack_names=[a["name"] for a in first["robustness"]["attacks"]],
        provenance=results["provenance"], pct=_pct)


def write_report(results: dict[str, Any], path: Path) -> Path:
    path.write_text(render_report(results))
    return path
