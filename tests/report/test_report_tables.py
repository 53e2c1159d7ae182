"""The page's tables over several models: every number sits under its own attack and eps, whatever
order and grid each run used; names are shown as text (escaped, no mathtext); files are UTF-8.
Built from small hand-written results, no model is trained."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from fortify.cli import app
from fortify.report import plots
from fortify.report.compare import merge_runs
from fortify.report.html import render_report
from fortify.report.results import load_results

THREAT = {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}


def _attack(name: str, accuracy: float, steps: int = 10) -> dict[str, Any]:
    return {"name": name, "settings": {"eps": 0.1, "steps": steps}, "mode": "independent", "attacked": 9,
            "adversarial_accuracy": accuracy, "success_rate": 0.5, "median_norm_successful": 0.1}


def _run(attacks: list[dict[str, Any]], curve: dict[float, float], n_examples: int,
         margin: dict[float, float] | None = None) -> dict[str, Any]:
    """A one-model `fortify run` results dict; ``margin`` adds the analysis the margin table reads."""
    robustness = {"threat": THREAT, "n_examples": n_examples, "clean_accuracy": 0.9,
                  "worst_case_accuracy": min(a["adversarial_accuracy"] for a in attacks), "attacks": attacks,
                  "eps_curve": [{"eps": e, "accuracy": a} for e, a in curve.items()],
                  "eps_curve_attack": attacks[-1]["name"], "warnings": []}
    model: dict[str, Any] = {"robustness": robustness}
    if margin is not None:
        model["analysis"] = _analysis(margin)
    return {"version": 2, "kind": "comparison", "config": None, "dataset": {"name": "digits"},
            "threat": THREAT, "models": {"net": model}, "provenance": {"seed": 0}}


def _analysis(margin: dict[float, float]) -> dict[str, Any]:
    shift = {"clean_mean": 1.0, "adversarial_mean": 0.5, "shift": -0.5}
    classes = {"macro_precision": 0.9, "macro_recall": 0.9, "macro_f1": 0.9}
    return {
        "score": {"clean_accuracy": 0.9, "worst_case_accuracy": 0.3, "harmonic_mean": 0.45, "eps_auc": 0.5,
                  "eps_max": 0.2},
        "margin": {"norm": "linf", "eps": 0.1, "distances": [0.05, 0.2],
                   "summary": {"n_examples": 2, "n_not_found": 0, "q1": 0.05, "median": 0.1, "q3": 0.2,
                               "eps": list(margin), "fraction_below": list(margin.values())}},
        "certified": {"sigma": 0.25, "n": 100, "alpha": 0.001, "abstained": 0, "above_margin": [],
                      "curve": {"n_examples": 2, "accuracy": [0.5]}},
        "metrics": {"entropy": shift, "margin": shift, "classes": {"clean": classes, "adversarial": classes}},
        "masking": {"masked": False, "n_attacked": 2, "n_examples": 2, "checks": [], "adaptive": [],
                    "notes": []},
        "attack": "pgd", "gallery": {},
    }


class _Tables(HTMLParser):
    """The cells of every table with an id, row by row, as text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            if self._table:
                self.tables[self._table] = []
        elif self._table and tag == "tr":
            self.tables[self._table].append([])
        elif self._table and tag in ("td", "th"):
            self.tables[self._table][-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._table and self.tables[self._table] and self.tables[self._table][-1]:
            self.tables[self._table][-1][-1] += data.strip()


def _tables(html: str) -> dict[str, list[dict[str, str]]]:
    """Each table with an id as a list of rows, each row a dict from its column header to its cell."""
    parser = _Tables()
    parser.feed(html)
    return {name: [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
            for name, rows in parser.tables.items() if rows}


def _two_runs(tmp_path: Path) -> dict[str, Any]:
    """Runs whose attacks come in different orders, under different eps grids and example counts."""
    first = _run([_attack("fgsm", 0.61), _attack("pgd", 0.42)], {0.05: 0.81, 0.1: 0.71}, 100,
                 margin={0.05: 0.11, 0.1: 0.21})
    second = _run([_attack("pgd", 0.33, steps=50), _attack("fgsm", 0.55), _attack("apgd", 0.27)],
                  {0.1: 0.64, 0.2: 0.44}, 60, margin={0.1: 0.31, 0.3: 0.51})
    runs = []
    for name, results in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results), encoding="utf-8")
        runs.append(load_results(tmp_path / name))
    return merge_runs(runs)


def test_comparison_puts_each_number_under_its_own_attack_and_eps(tmp_path):
    # Prepare / Execute
    tables = _tables(render_report(_two_runs(tmp_path)))
    # Assert: attack columns are the union, each accuracy under its own attack's name
    summary = {row["model"]: row for row in tables["summary"]}
    cells = {name: [row[a] for a in ("fgsm", "pgd", "apgd")] for name, row in summary.items()}
    assert cells == {"a/net": ["61.0%", "42.0%", "n/a"], "b/net": ["55.0%", "33.0%", "27.0%"]}
    # the example counts differ, so each model shows its own
    assert (summary["a/net"]["examples"], summary["b/net"]["examples"]) == ("100", "60")
    # accuracy versus eps: one row per eps of either grid, n/a where a run has no point
    curve = {row["eps"]: (row["a/net"], row["b/net"]) for row in tables["eps-curve"]}
    assert curve == {"0.05": ("81.0%", "n/a"), "0.1": ("71.0%", "64.0%"), "0.2": ("n/a", "44.0%")}
    # margin shares keyed by eps
    margin = {row["model"]: row for row in tables["margin"]}
    assert [margin["a/net"][f"share ≤ {e}"] for e in ("0.05", "0.1", "0.3")] == ["11.0%", "21.0%", "n/a"]
    assert [margin["b/net"][f"share ≤ {e}"] for e in ("0.05", "0.1", "0.3")] == ["n/a", "31.0%", "51.0%"]
    # attack settings of both runs, with the models each row belongs to
    settings = {(row["attack"], row["models"]): row["settings"] for row in tables["attack-settings"]}
    assert set(settings) == {("fgsm", "a/net, b/net"), ("pgd", "a/net"), ("pgd", "b/net"), ("apgd", "b/net")}
    assert '"steps": 50' in settings[("pgd", "b/net")] and '"steps": 10' in settings[("pgd", "a/net")]


def test_a_single_run_keeps_its_plain_layout(tmp_path):
    # one model: one example count in the heading, no per-model columns
    results = _run([_attack("fgsm", 0.61), _attack("pgd", 0.42)], {0.05: 0.81}, 100)
    html = render_report(results)
    tables = _tables(html)
    assert "100 test examples" in html
    assert list(tables["summary"][0]) == ["model", "clean", "fgsm", "pgd", "worst case"]
    assert list(tables["attack-settings"][0]) == ["attack", "settings"]


def test_runs_from_directories_of_one_name_keep_their_own_provenance(tmp_path):
    # Prepare: two runs both in a directory called "run"
    runs = []
    for parent, seed in (("x", 1), ("y", 2)):
        results = _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10)
        results["provenance"] = {"seed": seed}
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "results.json").write_text(json.dumps(results), encoding="utf-8")
        runs.append(load_results(tmp_path / parent / "run"))
    # Execute
    merged = merge_runs(runs)
    # Assert: the provenance rows carry the same names as the models, one per run
    assert list(merged["models"]) == ["run#1/net", "run#2/net"]
    assert list(merged["provenance"]) == ["run#1", "run#2"]
    assert "seed 1" in merged["provenance"]["run#1"] and "seed 2" in merged["provenance"]["run#2"]


def test_names_are_escaped_in_the_page():
    # Prepare: markup in the dataset and a model name
    results = _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10)
    results["dataset"]["name"] = "<script>alert(1)</script>"
    results["models"]["<script>x()</script>"] = results["models"].pop("net")
    # Execute
    html = render_report(results)
    # Assert: shown as text, never as a tag
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;script&gt;x()&lt;/script&gt;" in html


def test_a_dollar_sign_in_a_model_name_does_not_lose_a_figure():
    # Prepare: a name that is broken mathtext
    name = "m$\\frac{$"
    models = {name: _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10)["models"]["net"]}
    # Execute
    uri = plots.eps_curves(models, "linf", 0.1)
    html = render_report(_run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10) | {"models": copy.deepcopy(models)})
    # Assert
    assert uri is not None and uri.startswith("data:image/png;base64,")
    assert "could not be drawn" not in html


def test_results_and_page_are_utf8_whatever_the_locale(tmp_path):
    # Prepare: a non-ASCII model name, read and written under an ASCII locale
    results = _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10)
    results["models"]["modèle-α"] = results["models"].pop("net")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    script = ("import sys; from pathlib import Path; from fortify.report.html import write_report; "
              "from fortify.report.results import load_results; "
              "write_report(load_results(Path(sys.argv[1])), Path(sys.argv[1]) / 'report.html')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    # Execute
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)
    # Assert
    assert done.returncode == 0, done.stderr
    assert "modèle-α" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def _printed_rows(output: str) -> dict[str, dict[str, str]]:
    """The rows of the command's summary table (rich box drawing), each by its column header."""
    lines = [[cell.strip() for cell in line.strip("│┃ ").split("│" if "│" in line else "┃")]
             for line in output.splitlines() if line.lstrip().startswith(("│", "┃"))]
    header, *rows = lines
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_the_compare_command_prints_each_number_under_its_own_attack(tmp_path):
    # Prepare: two runs with different attacks, in different orders
    first = _run([_attack("fgsm", 0.61), _attack("pgd", 0.42)], {0.1: 0.7}, 10)
    second = _run([_attack("pgd", 0.33), _attack("apgd", 0.27)], {0.1: 0.6}, 10)
    for name, results in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results), encoding="utf-8")
    # Execute: wide enough that rich wraps no cell
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                      "--out", str(tmp_path / "c.html")], env={"COLUMNS": "200"})
    # Assert: the columns are the union of the attacks, and b's pgd sits under pgd, not under fgsm
    assert result.exit_code == 0, result.output
    rows = _printed_rows(result.output)
    columns = ("fgsm", "pgd", "apgd", "worst case")
    assert [rows["a/net"][c] for c in columns] == ["61.0%", "42.0%", "n/a", "42.0%"]
    assert [rows["b/net"][c] for c in columns] == ["n/a", "33.0%", "27.0%", "27.0%"]


def test_the_certified_figure_names_each_models_own_sigma(monkeypatch):
    # Prepare: a gaussian-trained model certified at its noise, another at the default; the figure kept
    drawn = []
    monkeypatch.setattr(plots, "to_data_uri", lambda fig: drawn.append(fig) or "uri")
    models = {}
    for name, sigma in (("gauss", 0.5), ("pgd", 0.25)):
        analysis = _analysis({0.1: 0.5})
        analysis["certified"] |= {"sigma": sigma, "curve": {"radii": [0.0, 0.5], "accuracy": [0.9, 0.4]}}
        models[name] = {"analysis": analysis}
    # Execute
    plots.certified_curves(models)
    # Assert: no title claims one sigma for both curves; each curve carries its own
    ax = drawn[0].axes[0]
    assert "sigma" not in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["gauss (sigma = 0.5)", "pgd (sigma = 0.25)"]


def _cascade(name: str, accuracy: float) -> dict[str, Any]:
    return _attack(name, accuracy) | {"mode": "cascade"}


def _write_runs(tmp_path: Path, runs: dict[str, dict[str, Any]]) -> list[Path]:
    directories = []
    for name, results in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(results), encoding="utf-8")
        directories.append(tmp_path / name)
    return directories


def test_a_cascade_accuracy_never_shares_a_column_with_the_attack_run_alone(tmp_path):
    # Prepare: run a attacks independently; run b runs the same attacks as a cascade (cumulative)
    a, b = _write_runs(tmp_path, {
        "a": _run([_attack("fgsm", 0.61), _attack("pgd", 0.42)], {0.1: 0.7}, 10),
        "b": _run([_cascade("fgsm", 0.55), _cascade("pgd", 0.30)], {0.1: 0.6}, 10)})
    # Execute
    html = render_report(merge_runs([load_results(a), load_results(b)]))
    printed = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "c.html")],
                                 env={"COLUMNS": "200"})
    # Assert: the page and the terminal table give the cascade its own, marked columns
    columns = ("fgsm", "pgd", "fgsm (cascade)", "pgd (cascade)")
    summary = {row["model"]: row for row in _tables(html)["summary"]}
    assert [summary["a/net"][c] for c in columns] == ["61.0%", "42.0%", "n/a", "n/a"]
    assert [summary["b/net"][c] for c in columns] == ["n/a", "n/a", "55.0%", "30.0%"]
    assert 'A column marked "(cascade)" is cumulative' in html
    assert printed.exit_code == 0, printed.output
    rows = _printed_rows(printed.output)
    assert [rows["a/net"][c] for c in columns] == ["61.0%", "42.0%", "n/a", "n/a"]
    assert [rows["b/net"][c] for c in columns] == ["n/a", "n/a", "55.0%", "30.0%"]
    # without a cascade, no note about one
    assert "(cascade)" not in render_report(load_results(a))


def test_a_run_read_through_a_relative_path_is_named_after_its_directory(tmp_path, monkeypatch):
    # Prepare: `fortify compare . ../other` from inside a run; an evaluation read as '.'
    here, other = _write_runs(tmp_path, {"here": _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10),
                                         "other": _run([_attack("fgsm", 0.4)], {0.1: 0.4}, 10)})
    evaluation = {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}},
                  "robustness": _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10)["models"]["net"]["robustness"]}
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "robustness.json").write_text(json.dumps(evaluation), encoding="utf-8")
    monkeypatch.chdir(here)
    # Execute
    merged = merge_runs([load_results(Path(".")), load_results(Path("../other"))])
    monkeypatch.chdir(tmp_path / "mlp")
    evaluated = load_results(Path("."))
    # Assert
    assert list(merged["models"]) == ["here/net", "other/net"]
    assert list(evaluated["models"]) == ["mlp"]


def test_runs_whose_numbered_names_collide_all_keep_their_models(tmp_path):
    # Prepare: two runs in directories called x get x#1 and x#2, and a third run's directory is x#2
    directories = _write_runs(tmp_path, {
        f"col/{path}": _run([_attack("fgsm", accuracy)], {0.1: accuracy}, 10) | {"provenance": {"seed": seed}}
        for seed, (path, accuracy) in enumerate((("p/x", 0.1), ("q/x", 0.2), ("x#2", 0.3)))})
    # Execute
    merged = merge_runs([load_results(d) for d in directories])
    # Assert: three runs, three names, every model kept with its own numbers and provenance
    assert len(merged["provenance"]) == 3
    accuracy = {name: m["robustness"]["attacks"][0]["adversarial_accuracy"]
                for name, m in merged["models"].items()}
    assert sorted(accuracy.values()) == [0.1, 0.2, 0.3]
    assert accuracy["x#2/net"] == 0.3  # the directory really called x#2 keeps its name
    seeds = {0.1: "seed 0", 0.2: "seed 1", 0.3: "seed 2"}
    for prefix, line in merged["provenance"].items():
        assert seeds[accuracy[f"{prefix}/net"]] in line, (prefix, line)


def _gallery_example(clean: list[Any], adversarial: list[Any]) -> dict[str, Any]:
    return {"index": 0, "label": 3, "clean_prediction": 3, "adversarial_prediction": 5, "clean": clean,
            "adversarial": adversarial}


def test_the_gallery_shows_images_of_any_box_as_they_are(monkeypatch):
    # Prepare: a run on pixels in [0, 255] (an npz with its bounds); its gallery holds raw pixel values
    drawn = []
    monkeypatch.setattr(plots, "to_data_uri", lambda fig: drawn.append(fig) or "uri")
    box = {"norm": "linf", "eps": 25.5, "bounds": [0.0, 255.0]}
    clean, adversarial = [[[51.0, 102.0], [153.0, 204.0]]], [[[76.5, 76.5], [178.5, 229.5]]]
    results = _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10, margin={0.1: 0.5}) | {"threat": box}
    results["models"]["net"]["analysis"]["gallery"] = {"shape": [1, 2, 2],
                                                       "examples": [_gallery_example(clean, adversarial)]}
    # Execute
    render_report(results)
    # Assert: the images are scaled from the box (not clipped to [0, 1], which paints them white), and
    # the perturbation of a tenth of the range is amplified 5 times to fill half the grey range
    gallery = next(fig for fig in drawn if fig.get_suptitle().startswith("net: clean"))
    images = [ax.get_images()[0].get_array() for ax in gallery.axes]
    assert [[round(float(v), 3) for v in row] for row in images[0]] == [[0.2, 0.4], [0.6, 0.8]]
    assert [[round(float(v), 3) for v in row] for row in images[1]] == [[0.3, 0.3], [0.7, 0.9]]
    assert [ax.get_title() for ax in gallery.axes] == ["3 -> 3", "-> 5", "x5.0"]


def test_the_gallery_title_fits_its_figure_with_one_example(monkeypatch):
    # Prepare: the attack fooled a single example, so the gallery has one column
    drawn = []
    monkeypatch.setattr(plots, "to_data_uri", lambda fig: drawn.append(fig) or "uri")
    pixels = [[[0.2, 0.4], [0.6, 0.8]]]
    # Execute
    plots.gallery("digits-20250101-120000/standard", {"examples": [_gallery_example(pixels, pixels)]})
    # Assert: the title that explains the three rows is inside the figure, not cut at its edges
    fig = drawn[0]
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width


def test_a_margin_quartile_no_search_reached_reads_as_infinite_not_missing():
    # Prepare: FMN found no adversarial point for 3 of 4 examples: median and q3 are inf, null in JSON
    results = _run([_attack("fgsm", 0.5)], {0.1: 0.5}, 10, margin={0.1: 0.25})
    results["models"]["net"]["analysis"]["margin"]["summary"] |= {
        "n_examples": 4, "n_not_found": 3, "q1": 0.06, "median": None, "q3": None}
    # Execute
    margin = _tables(render_report(results))["margin"][0]
    # Assert: an upper bound of infinity is not a value the results lack
    assert (margin["q1"], margin["median"], margin["q3"], margin["not found"]) == ("0.06", "∞", "∞", "3")


def test_masking_evidence_and_attack_settings_keep_their_small_numbers():
    # Prepare: a check that failed with a tiny p-value, an attack with a tiny step
    results = _run([_attack("pgd", 0.5) | {"settings": {"eps": 0.001, "step_size": 2.5e-05}}], {0.1: 0.5},
                   10, margin={0.1: 0.5})
    results["models"]["net"]["analysis"]["masking"] |= {"masked": True, "checks": [
        {"name": "iterative_vs_single_step", "passed": False, "explanation": "FGSM beats PGD.",
         "evidence": {"p_value": 3.7e-09, "pgd_success": 0.123456}}]}
    # Execute
    html = render_report(results)
    # Assert: rounded for reading, to significant digits, never to 0
    assert '"p_value": 3.7e-09' in unescape(html) and '"pgd_success": 0.1235' in unescape(html)
    assert '"step_size": 2.5e-05' in _tables(html)["attack-settings"][0]["settings"]
