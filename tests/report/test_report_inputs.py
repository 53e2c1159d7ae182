"""Bad inputs to `fortify report` and `fortify compare`: results files with wrongly typed fields, and
outputs that would overwrite the results or cannot be written. Each gets one clear error, never a
traceback, and nothing on disk is lost. Built from small hand-written results, no model is trained."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import file_size_limit
from fortify.cli import app
from fortify.errors import ConfigError, ResultsError
from fortify.report.compare import merge_runs, write_comparison
from fortify.report.html import render_report, write_report
from fortify.report.results import load_results

runner = CliRunner()
THREAT = {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}


def _results() -> dict[str, Any]:
    """The least a `fortify run` results.json holds: one model's robustness, no optional section."""
    attack = {"name": "fgsm", "settings": {"eps": 0.1}, "mode": "independent", "attacked": 9,
              "adversarial_accuracy": 0.3, "success_rate": 0.6, "median_norm_successful": 0.1}
    robustness = {"threat": THREAT, "n_examples": 10, "clean_accuracy": 0.9, "worst_case_accuracy": 0.3,
                  "attacks": [attack], "eps_curve": [{"eps": 0.05, "accuracy": 0.5}],
                  "eps_curve_attack": "fgsm", "warnings": []}
    return {"version": 2, "kind": "comparison", "config": None, "dataset": {"name": "digits"},
            "threat": THREAT, "models": {"pgd": {"robustness": robustness}}, "provenance": {}}


def _write_run(directory: Path, results: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results))
    return directory


def _with(results: dict[str, Any], keys: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(results)
    target = changed
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return changed


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output  # 1 would be an uncaught exception
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith("error:") and result.output.strip().count("\n") == 0, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


ROB = ("models", "pgd", "robustness")
WRONG_FIELDS = [
    (ROB + ("attacks",), None, "models.pgd.robustness.attacks is null; expected a list"),
    (ROB + ("attacks", 0), None, "models.pgd.robustness.attacks[0] is null; expected an object"),
    (ROB + ("clean_accuracy",), "high", "models.pgd.robustness.clean_accuracy is the string 'high'; "
                                        "expected a number"),
    (ROB + ("worst_case_accuracy",), None, "models.pgd.robustness.worst_case_accuracy is null"),
    (ROB + ("attacks", 0, "adversarial_accuracy"), True, "adversarial_accuracy is true; expected a number"),
    (ROB + ("eps_curve", 0, "eps"), [0.1], "eps_curve[0].eps is a list of 1; expected a number"),
    (("threat", "eps"), "0.1", "threat.eps is the string '0.1'; expected a number"),
    (("threat", "bounds"), [0.0], "threat.bounds is a list of 1; expected a list of 2"),
    (("dataset",), None, "dataset is null; expected an object"),
    (("models", "pgd"), [], "models.pgd is a list of 0; expected an object"),
    (("models", "pgd", "analysis"), "yes", "models.pgd.analysis is the string 'yes'; expected an object"),
    (("models", "pgd", "privacy"), {"membership": [{"attack": "loss"}], "warnings": []},
     "models.pgd.privacy.membership[0] lacks n_members"),
    (("models", "pgd", "training"), {"seconds": None, "history": [], "best_epoch": 1,
                                     "selection_metric": "val", "stopped_early": False},
     "models.pgd.training.seconds is null; expected a number"),
    (("provenance",), "x", "provenance is the string 'x'; expected an object"),
    # numbers the page prints as percentages or as the threat model: in range, or refused
    (ROB + ("clean_accuracy",), 2.5,
     "models.pgd.robustness.clean_accuracy is 2.5; expected a number from 0 to 1"),
    (ROB + ("worst_case_accuracy",), float("nan"),
     "worst_case_accuracy is nan; expected a number from 0 to 1"),
    (ROB + ("attacks", 0, "adversarial_accuracy"), -0.1,
     "adversarial_accuracy is -0.1; expected a number from 0"),
    (("threat", "eps"), -1, "threat.eps is -1; expected a finite number > 0"),
    # the strongest membership attack is picked by AUC: a NaN would make the pick arbitrary
    (("models", "pgd", "privacy"), {"membership": [{"attack": "loss", "n_members": 1, "n_nonmembers": 1,
                                                    "auc": float("nan")}], "warnings": []},
     "models.pgd.privacy.membership[0].auc is nan; expected a number from 0 to 1"),
    (("dataset", "class_names"), 5, "dataset.class_names is 5; expected a list"),
]


@pytest.mark.parametrize(("keys", "value", "fragment"), WRONG_FIELDS)
def test_wrongly_typed_fields_are_named_where_the_results_are_read(tmp_path, keys, value, fragment):
    # Prepare
    run = _write_run(tmp_path / "run", _with(_results(), keys, value))
    # Execute and Assert: the error names the file and the field, before anything is rendered
    with pytest.raises(ResultsError, match=re.escape(fragment)) as raised:
        load_results(run)
    assert str(run / "results.json") in str(raised.value)


def test_report_and_compare_commands_refuse_a_wrongly_typed_run_in_one_line(tmp_path):
    # Prepare: a good run and one whose attack list is null
    good = _write_run(tmp_path / "good", _results())
    bad = _write_run(tmp_path / "bad", _with(_results(), ROB + ("attacks",), None))
    # Execute
    reported = runner.invoke(app, ["report", str(bad), "--out", str(tmp_path / "r.html")])
    compared = runner.invoke(app, ["compare", str(good), str(bad), "--out", str(tmp_path / "c.html")])
    # Assert
    _assert_one_line_error(reported, "models.pgd.robustness.attacks is null")
    _assert_one_line_error(compared, "models.pgd.robustness.attacks is null")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "c.html").exists()


def test_an_evaluation_and_its_training_json_are_checked_with_their_own_field_names(tmp_path):
    # Prepare: a `fortify evaluate` model directory
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    evaluation = {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}},
                  "robustness": _results()["models"]["pgd"]["robustness"]}
    (model_dir / "robustness.json").write_text(json.dumps(evaluation))
    (model_dir / "training.json").write_text(json.dumps({"seconds": "fast"}))
    # Execute and Assert: training.json is named, not robustness.json
    with pytest.raises(ResultsError, match=re.escape("training.json: seconds is the string 'fast'")):
        load_results(model_dir)
    (model_dir / "training.json").unlink()
    assert load_results(model_dir)["models"]["model"]["robustness"]["clean_accuracy"] == 0.9
    bad = _with(evaluation, ("robustness", "threat"), {"norm": "linf", "eps": None, "bounds": [0, 1]})
    (model_dir / "robustness.json").write_text(json.dumps(bad))
    with pytest.raises(ResultsError, match=re.escape("robustness.json: robustness.threat.eps is null")):
        load_results(model_dir)


def test_absent_or_empty_optional_sections_still_render(tmp_path):
    # Prepare: sections left out the ways a writer may leave them out (null, empty), and nulls where
    # a non-finite number was written
    results = _results()
    results["models"]["pgd"] |= {"analysis": None, "privacy": {}, "tabular": [], "training": None}
    results["models"]["pgd"]["robustness"]["attacks"][0]["median_norm_successful"] = None
    results["models"]["other"] = copy.deepcopy(_results()["models"]["pgd"])
    results["models"]["other"]["training"] = {"seconds": 2.5, "history": [{}], "best_epoch": 1,
                                              "selection_metric": "val", "stopped_early": False}
    results["models"]["older"] = copy.deepcopy(results["models"]["other"])
    results["models"]["older"]["training"]["seconds"] = float("nan")  # as older results files hold
    run = _write_run(tmp_path / "run", results)
    # Execute
    html = render_report(load_results(run))
    # Assert: the notes say what is missing; a model without training, or without a finite training
    # time, gets n/a in that column
    assert "pgd: no analysis in the results" in html and "pgd: no privacy audit" in html
    rows = {name: html[html.index(f'<tr data-model="{name}">'):] for name in ("pgd", "other", "older")}
    assert rows["pgd"][:rows["pgd"].index("</tr>")].endswith("<td>n/a</td>")
    assert rows["other"][:rows["other"].index("</tr>")].endswith("<td>2.5</td>")
    assert rows["older"][:rows["older"].index("</tr>")].endswith("<td>n/a</td>")


@pytest.mark.parametrize("out", ["results.json", "report.txt", "report", "../run/results.json"])
def test_report_is_never_written_over_the_results_or_to_a_non_html_file(tmp_path, out):
    # Prepare
    run = _write_run(tmp_path / "run", _results())
    before = (run / "results.json").read_bytes()
    # Execute
    result = runner.invoke(app, ["report", str(run), "--out", str(run / out)])
    # Assert: refused before writing; the results are intact and still load
    _assert_one_line_error(result, ".html")
    assert (run / "results.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]
    load_results(run)


def test_a_results_file_named_html_is_not_overwritten_by_its_own_report_or_comparison(tmp_path):
    # Prepare: a results file passed as a file, under an .html name, and a link to it
    source = tmp_path / "copy.html"
    source.write_text(json.dumps(_results()))
    other = _write_run(tmp_path / "other", _results())
    link = tmp_path / "link.html"
    link.symlink_to(source)
    # Execute and Assert: refused by the package functions themselves, whoever calls them
    for out in (source, link, tmp_path / "other" / ".." / "copy.html"):
        with pytest.raises(ConfigError, match="is the results file the report is drawn from"):
            write_report(load_results(source), out)
        with pytest.raises(ConfigError, match="is the results file the report is drawn from"):
            write_report(merge_runs([load_results(other), load_results(source)]), out)
        with pytest.raises(ConfigError, match="is the results file the report is drawn from"):
            write_comparison([other, source], out)
    assert json.loads(source.read_text()) == _results()


def test_compare_refuses_a_non_html_out_before_writing(tmp_path):
    # Prepare
    first, second = _write_run(tmp_path / "a", _results()), _write_run(tmp_path / "b", _results())
    before = (first / "results.json").read_bytes()
    # Execute
    result = runner.invoke(app, ["compare", str(first), str(second), "--out", str(first / "results.json")])
    # Assert
    _assert_one_line_error(result, "write it to a .html file", "results.json")
    assert (first / "results.json").read_bytes() == before


def test_report_and_comparison_create_missing_parent_directories(tmp_path):
    # Prepare: outputs under directories that do not exist yet (as `fortify export --out` allows)
    first, second = _write_run(tmp_path / "a", _results()), _write_run(tmp_path / "b", _results())
    report_out, compare_out = tmp_path / "new" / "deeper" / "r.html", tmp_path / "cmp" / "c.html"
    # Execute
    reported = runner.invoke(app, ["report", str(first), "--out", str(report_out)])
    compared = runner.invoke(app, ["compare", str(first), str(second), "--out", str(compare_out)])
    # Assert: both pages are there and whole (no temporary file left beside them)
    assert reported.exit_code == 0, reported.output
    assert compared.exit_code == 0, compared.output
    assert report_out.read_text().rstrip().endswith("</html>")
    assert "a/pgd" in compare_out.read_text() and "b/pgd" in compare_out.read_text()
    assert [p.name for p in report_out.parent.iterdir()] == ["r.html"]


def _with_every_section() -> dict[str, Any]:
    """``_results()`` plus every optional section the page prints percentages from."""
    results = _results()
    model = results["models"]["pgd"]
    model["robustness"]["precision"] = {"amp": "bf16", "examples": 10, "clean_agreement": 1.0,
                                        "attack": "fgsm", "attacked": 9, "robust_agreement": 0.9}
    shift = {"clean_mean": 1.0, "adversarial_mean": 0.5, "shift": -0.5}
    macro = {"macro_precision": 0.9, "macro_recall": 0.9, "macro_f1": 0.9}
    model["analysis"] = {
        "attack": "fgsm", "gallery": {},
        "score": {"clean_accuracy": 0.9, "worst_case_accuracy": 0.3, "harmonic_mean": 0.45,
                  "eps_auc": 0.5, "eps_max": 0.2},
        "margin": {"norm": "linf", "summary": {"n_examples": 2, "n_not_found": 0, "q1": 0.05, "median": 0.1,
                                               "q3": 0.2, "eps": [0.1], "fraction_below": [0.5]}},
        "certified": {"sigma": 0.25, "n": 100, "alpha": 0.001, "abstained": 0, "above_margin": [],
                      "curve": {"n_examples": 2, "accuracy": [0.5]}},
        "metrics": {"entropy": shift, "margin": shift, "classes": {"clean": macro, "adversarial": macro}},
        "masking": {"masked": True, "n_attacked": 2, "n_examples": 2, "checks": [], "notes": [],
                    "adaptive": [{"name": "eot", "triggered_by": ["noise"], "plain_success": 0.2,
                                  "adaptive_success": 0.6}]}}
    model["privacy"] = {"warnings": [], "membership": [{
        "attack": "loss", "n_members": 10, "n_nonmembers": 10, "auc": 0.6, "balanced_accuracy": 0.55,
        "advantage": 0.1, "tpr_at_fpr": {"0.01": 0.02}}]}
    model["tabular"] = {"feature_changes": [], "settings": [
        {"setting": "box", "threat": "linf", "worst_case_accuracy": 0.3, "accuracy": {"pgd": 0.3}}]}
    model["training"] = {"seconds": 1.0, "history": [{}], "best_epoch": 1, "selection_metric": "val",
                         "stopped_early": False, "canary_audit": {"n_inserted": 5, "n_held_out": 5,
                                                                   "epsilon_lower": 0.1, "confidence": 0.95,
                                                                   "auc": 0.6}}
    return results


MODEL = ("models", "pgd")
ANALYSIS = MODEL + ("analysis",)
# every field the page prints with pct(), besides the robustness accuracies WRONG_FIELDS covers:
# where it is in _with_every_section(), and how the error names it
PERCENTAGES = [
    (ROB + ("precision", "clean_agreement"), "robustness.precision.clean_agreement"),
    (ROB + ("precision", "robust_agreement"), "robustness.precision.robust_agreement"),
    (ANALYSIS + ("score", "clean_accuracy"), "analysis.score.clean_accuracy"),
    (ANALYSIS + ("score", "worst_case_accuracy"), "analysis.score.worst_case_accuracy"),
    (ANALYSIS + ("margin", "summary", "fraction_below", 0), "analysis.margin.summary.fraction_below[0]"),
    (ANALYSIS + ("certified", "curve", "accuracy", 0), "analysis.certified.curve.accuracy[0]"),
    (ANALYSIS + ("masking", "adaptive", 0, "plain_success"), "analysis.masking.adaptive[0].plain_success"),
    (ANALYSIS + ("masking", "adaptive", 0, "adaptive_success"),
     "analysis.masking.adaptive[0].adaptive_success"),
    (MODEL + ("privacy", "membership", 0, "tpr_at_fpr", "0.01"), "privacy.membership[0].tpr_at_fpr.0.01"),
    (MODEL + ("tabular", "settings", 0, "worst_case_accuracy"), "tabular.settings[0].worst_case_accuracy"),
    (MODEL + ("tabular", "settings", 0, "accuracy", "pgd"), "tabular.settings[0].accuracy.pgd"),
    (MODEL + ("training", "canary_audit", "confidence"), "training.canary_audit.confidence"),
]


def test_the_results_with_every_percentage_field_load_and_render(tmp_path):
    # the fractions as written pass: the refusals below are the out-of-range values' doing
    html = render_report(load_results(_write_run(tmp_path / "run", _with_every_section())))
    assert "(95.0%)" in html and "2.0% at FPR 1%" in html  # the canary confidence, the TPR at low FPR


@pytest.mark.parametrize("value", [2.5, float("nan")], ids=["2.5", "nan"])
@pytest.mark.parametrize(("keys", "where"), PERCENTAGES, ids=[where for _, where in PERCENTAGES])
def test_a_field_printed_as_a_percentage_must_be_a_fraction(tmp_path, keys, where, value):
    # Prepare: a value that would print as 250.0% or nan%
    run = _write_run(tmp_path / "run", _with(_with_every_section(), keys, value))
    # Execute and Assert: refused where it is read, naming the field and what it must be
    expected = f"models.pgd.{where} is {value!r}; expected a number from 0 to 1"
    with pytest.raises(ResultsError, match=re.escape(expected)):
        load_results(run)


def test_the_threat_model_refusal_shows_the_digits_that_differ(tmp_path):
    # Prepare: two runs whose eps differ in the seventh digit
    first = _write_run(tmp_path / "a", _with(_results(), ("threat", "eps"), 0.2))
    second = _write_run(tmp_path / "b", _with(_results(), ("threat", "eps"), 0.2000001))
    # Execute and Assert
    with pytest.raises(ResultsError, match="same threat model") as raised:
        merge_runs([load_results(first), load_results(second)])
    assert "eps=0.2000001" in str(raised.value) and "eps=0.2 " in str(raised.value)


def test_the_note_on_a_missing_analysis_does_not_name_a_command_that_did_not_write_the_results(tmp_path):
    # Prepare: a `fortify evaluate` result without --report (no analysis, no privacy audit)
    (tmp_path / "model").mkdir()
    evaluation = {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}},
                  "robustness": _results()["models"]["pgd"]["robustness"]}
    (tmp_path / "model" / "robustness.json").write_text(json.dumps(evaluation))
    # Execute
    html = render_report(load_results(tmp_path / "model"))
    # Assert
    note = html[html.index("model: no analysis in the results"):]
    note = note[:note.index("</li>")]
    assert "fortify run" not in note and "did not run it" in note


def _evaluation(class_names: list[str] | None) -> dict[str, Any]:
    """A `fortify evaluate` robustness.json: one model's sections at the top level."""
    run = _results()
    dataset = {"name": "digits", **({"class_names": class_names} if class_names else {})}
    return {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}}, "dataset": dataset,
            "robustness": run["models"]["pgd"]["robustness"], "provenance": {}}


def test_class_names_reach_the_page_from_an_evaluation_and_from_runs_that_agree(tmp_path):
    # Prepare: two runs naming their classes alike, a third naming them otherwise
    names = ["cat", "dog"]
    a = _write_run(tmp_path / "a", _with(_results(), ("dataset", "class_names"), names))
    b = _write_run(tmp_path / "b", _with(_results(), ("dataset", "class_names"), names))
    c = _write_run(tmp_path / "c", _with(_results(), ("dataset", "class_names"), ["no", "yes"]))
    evaluated = tmp_path / "model"
    evaluated.mkdir()
    (evaluated / "robustness.json").write_text(json.dumps(_evaluation(names)))
    # Execute
    agreeing, disagreeing = merge_runs([load_results(a), load_results(b)]), merge_runs(
        [load_results(a), load_results(c)])
    # Assert
    assert load_results(evaluated)["dataset"]["class_names"] == names
    assert agreeing["dataset"]["class_names"] == names
    assert "class_names" not in disagreeing["dataset"]
    assert "class_names" not in load_results(_write_run(tmp_path / "d", _results()))["dataset"]


def test_the_epsilon_of_dp_sgd_without_noise_reads_as_infinite_not_missing(tmp_path):
    # Prepare: DP-SGD at noise 0 spends an infinite epsilon, which results.json holds as null
    results = _results()
    privacy = {"accountant": "prv", "epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0, "steps": 20,
               "replaced_modules": []}
    results["models"]["pgd"]["training"] = {
        "seconds": 1.0, "history": [{"epsilon": None}], "best_epoch": 1, "selection_metric": "val",
        "stopped_early": False, "privacy": {**privacy, "noise_multiplier": 0.0}}
    results["models"]["noisy"] = copy.deepcopy(results["models"]["pgd"])
    results["models"]["noisy"]["training"]["privacy"] = {**privacy, "noise_multiplier": 1.0}
    # Execute
    html = render_report(load_results(_write_run(tmp_path / "run", results)))
    # Assert: infinite where no noise was added; a missing value stays n/a
    table = html.split('<table id="dp-table">')[1].split("</table>")[0]
    pgd, noisy = table.split("<tr><td>noisy</td>")
    assert "<td>\u221e (no noise)</td>" in pgd and "epsilon after each epoch:\n\u221e (no noise)" in pgd
    assert "\u221e" not in noisy and "<td>n/a</td>" in noisy


@pytest.mark.parametrize("training, shown", [
    ({"best_epoch": 1, "selected_epoch": 3, "selection_metric": "last epoch"}, ["3", "3", "last epoch"]),
    ({"best_epoch": 2, "selection_metric": "val"}, ["3", "2", "val"]),  # written before selected_epoch
])
def test_the_training_table_shows_the_epoch_the_model_holds(tmp_path, training, shown):
    # Prepare: three epochs run; early stopping off kept the last although the first validated best
    results = _results()
    results["models"]["pgd"]["training"] = {"seconds": 1.0, "history": [{}, {}, {}], "stopped_early": False,
                                            **training}
    # Execute
    html = render_report(load_results(_write_run(tmp_path / "run", results)))
    # Assert: epochs run, selected epoch, selected by
    section = html[html.index('<h2 id="training">'):]
    row = section[section.index("<tr><td>pgd</td>"):]
    cells = re.findall(r"<td>([^<]*)</td>", row[:row.index("</tr>")])
    assert cells[1:4] == shown


def test_compare_refuses_one_run_given_twice_by_any_spelling(tmp_path):
    run = _write_run(tmp_path / "a", _results())
    for twice in ([run, run], [run, tmp_path / "b" / ".." / "a"], [run, run / "results.json"]):
        (tmp_path / "b").mkdir(exist_ok=True)
        with pytest.raises(ResultsError, match="is given twice; compare different runs"):
            write_comparison(twice, tmp_path / "c.html")
    assert not (tmp_path / "c.html").exists()


@pytest.mark.skipif(not file_size_limit.SUPPORTED, reason="needs POSIX file size limits")
def test_a_page_the_disk_cannot_hold_names_the_page_and_leaves_nothing(tmp_path):
    runs = [_write_run(tmp_path / name, _results()) for name in ("a", "b")]
    page = tmp_path / "out" / "c.html"
    proc = file_size_limit.run_with_file_size_limit(file_size_limit.FORTIFY_CLI, "compare", *runs,
                                                    "--out", page, limit=4_000)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot use {page}: File too large" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("keys", "value", "fragment"), [
    # one share short, the page showed every share under the next eps, without a word
    (ANALYSIS + ("margin", "summary", "fraction_below"), [], "holds 1 eps but 0 fraction_below"),
    (ANALYSIS + ("certified", "curve", "radii"), [0.0, 0.1], "holds 2 radii but 1 accuracy"),
])
def test_lists_the_page_pairs_by_position_must_be_equally_long(tmp_path, keys, value, fragment):
    run = _write_run(tmp_path / "run", _with(_with_every_section(), keys, value))
    with pytest.raises(ResultsError, match=re.escape(fragment)):
        load_results(run)


def test_a_version_of_true_or_a_privacy_file_of_another_kind_or_version_is_refused(tmp_path):
    # True == 1 in Python, so "version": true read as version 1; privacy.json was merged unchecked
    with pytest.raises(ResultsError, match="results version True"):
        load_results(_write_run(tmp_path / "a", {**_results(), "version": True}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    evaluation = {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}},
                  "robustness": _results()["models"]["pgd"]["robustness"]}
    (model_dir / "robustness.json").write_text(json.dumps(evaluation))
    privacy = {"warnings": [], "membership": []}
    for written, fragment in (({"version": 2, "kind": "other", "privacy": privacy}, "kind"),
                              ({"version": 99, "kind": "privacy", "privacy": privacy}, "version 99")):
        (model_dir / "privacy.json").write_text(json.dumps(written))
        with pytest.raises(ResultsError, match=fragment):
            load_results(model_dir)
