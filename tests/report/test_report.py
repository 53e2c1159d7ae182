"""The HTML report: every section from the results, self-contained, and robust to missing parts."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from fortify.cli import app
from fortify.errors import ResultsError
from fortify.report.compare import merge_runs
from fortify.report.html import render_report
from fortify.report.results import load_results
from fortify.report.schema import COMPARISON, Mismatch
from fortify.report.schema import check as check_schema

pytestmark = pytest.mark.slow  # the shared fixture attacks and audits two models
runner = CliRunner()


class _Collector(HTMLParser):
    """Image sources, link targets and visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if tag != "img" and attrs.get(key):
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def test_report_shows_every_section_with_the_results_numbers(run_dir):
    # Execute
    results = load_results(run_dir)
    page = _parse(render_report(results))
    text = " ".join(page.text)
    # Assert: self-contained: every figure is an embedded PNG, nothing is fetched
    assert len(page.images) >= 10
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == []
    for heading in ("Verdict", "Clean and robust accuracy", "Robustness score", "Accuracy versus eps",
                    "Robust margin and certified radius", "Defensive entropy and margin",
                    "Precision, recall and F1 per class", "Gallery", "Gradient-masking checks",
                    "Privacy: membership inference", "Provenance"):
        assert heading in text, heading
    # the key numbers of results.json appear
    for model in results["models"].values():
        rob, analysis = model["robustness"], model["analysis"]
        assert _pct(rob["clean_accuracy"]) in text and _pct(rob["worst_case_accuracy"]) in text
        assert f"{analysis['score']['harmonic_mean']:.3g}" in text
        assert f"{analysis['metrics']['classes']['clean']['macro_f1']:.3g}" in text
        for check in analysis["masking"]["checks"]:
            assert check["name"] in text
        for attack in model["privacy"]["membership"]:
            assert f"{attack['auc']:.3g}" in text


def test_verdict_names_failed_masking_checks(run_results):
    # Prepare: one model's verdict says a check failed
    results = json.loads(json.dumps(run_results))
    checks = results["models"]["pgd"]["analysis"]["masking"]["checks"]
    checks[0]["passed"] = False
    results["models"]["pgd"]["analysis"]["masking"]["masked"] = True
    # Execute
    html = render_report(results)
    # Assert
    verdict = html[html.index('data-model="pgd"'):]
    verdict = verdict[:verdict.index("</div>")]
    assert "Gradient masking suspected" in verdict and checks[0]["name"] in verdict


def test_a_masking_verdict_not_judged_reads_so_with_its_reason(run_results):
    # Prepare: the pgd model's verdict could not be judged (analyse: no example classified correctly)
    results = json.loads(json.dumps(run_results))
    reason = "Not judged: the model classifies none of these 200 examples correctly."
    results["models"]["pgd"]["analysis"]["masking"].update(masked=None, checks=[], n_attacked=0, adaptive=[],
                                                          notes=[reason])
    # Execute
    html = render_report(results)
    # Assert: neither a pass nor a failure, in the verdict or in the section
    verdict = html[html.index('data-model="pgd"'):]
    verdict = verdict[:verdict.index("</div>")]
    assert "Gradient masking <b>not judged</b>" in verdict
    assert "No gradient-masking checks" not in verdict and "No sign of gradient masking" not in verdict
    section = html[html.index('id="masking"'):]
    section = " ".join(section[section.index("<h3>pgd:"):].split())
    assert section.startswith("<h3>pgd: not judged (0 of 40 examples attacked)</h3> <p class=\"note\">")
    assert reason in section


def test_report_renders_what_it_has_when_sections_are_missing(run_results):
    # Prepare: one model without analysis and privacy (a version-1 run), one with a broken figure input
    results = json.loads(json.dumps(run_results))
    del results["models"]["standard"]["analysis"], results["models"]["standard"]["privacy"]
    results["models"]["pgd"]["analysis"]["margin"]["distances"] = "not a list"
    # Execute
    html = render_report(results)
    text = " ".join(_parse(html).text)
    # Assert: notes say what is missing, the rest is there
    assert "standard: no analysis in the results" in text
    assert "figure 'robust margin' could not be drawn" in text
    assert _pct(results["models"]["standard"]["robustness"]["worst_case_accuracy"]) in text
    assert "Gradient-masking checks" in text


def test_report_renders_the_optional_fields_the_schema_lets_a_results_file_leave_out(run_results):
    # Prepare: masking without notes or adaptive reruns, and a DP history whose epochs lack epsilon
    results = json.loads(json.dumps(run_results))
    masking = results["models"]["pgd"]["analysis"]["masking"]
    del masking["notes"], masking["adaptive"]
    training = results["models"]["pgd"].setdefault("training", {"seconds": 1.0, "history": [{}],
                                                                 "best_epoch": 1, "selection_metric": "x",
                                                                 "stopped_early": False})
    training["privacy"] = {"accountant": "prv", "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
                           "max_grad_norm": 1.0, "steps": 1, "replaced_modules": []}
    for record in training["history"]:
        record.pop("epsilon", None)
    check_schema(results, COMPARISON)  # what the schema accepts, the page must render
    # Execute / Assert
    assert "Gradient-masking checks" in " ".join(_parse(render_report(results)).text)


def test_the_report_warns_of_held_out_copies_of_training_inputs(run_results):
    # Prepare
    results = json.loads(json.dumps(run_results))
    results["dataset"]["inputs_also_in_train"] = {"validation": 2, "test": 5}
    check_schema(results, COMPARISON)
    # Execute
    text = " ".join(_parse(render_report(results)).text)
    # Assert
    assert "data: 5 test and 2 validation inputs are exact copies of training inputs" in text
    assert "exact copies" not in " ".join(_parse(render_report(run_results)).text)


@pytest.mark.parametrize("counts", [{"validation": -1, "test": 0}, {"validation": True, "test": 0},
                                    {"validation": 1.5, "test": 0}, {"test": 3}])
def test_the_schema_refuses_copy_counts_that_are_not_whole_numbers(run_results, counts):
    results = json.loads(json.dumps(run_results))
    results["dataset"]["inputs_also_in_train"] = counts
    with pytest.raises(Mismatch, match="inputs_also_in_train"):
        check_schema(results, COMPARISON)


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", "is not valid JSON"),
    (json.dumps({"version": 99, "kind": "comparison"}), "results version 99"),
    (json.dumps({"version": 2, "kind": "privacy"}), "of kind 'privacy'"),
    (json.dumps({"version": 2, "kind": "comparison", "models": {}}), "lacks threat, dataset"),
    (json.dumps([1, 2]), "must hold a JSON object"),
])
def test_bad_results_files_are_named_in_the_error(tmp_path, content, fragment):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsError, match=re.escape(fragment)):
        load_results(tmp_path)


def test_run_directory_without_results_is_refused(tmp_path):
    with pytest.raises(ResultsError, match="holds no results"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match="does not exist"):
        load_results(tmp_path / "missing")


@pytest.mark.parametrize("holds, fragment", [
    ({"sweep.json": "{}", "pgd_eps0.2_ep1/result.json": "{}"},
     "it is a sweep directory, summarised in sweep.csv and tradeoff.png: give one of its runs, {d}/RUN (its "
     "finished runs: pgd_eps0.2_ep1)"),
    ({"model.json": "{}"}, "it holds a trained model: evaluate it with `fortify evaluate {d}` first"),
    ({"config.yaml": ""}, "finish it with `fortify run --resume --out {d}`"),
    ({"notes.txt": ""}, "it holds nothing fortify wrote: give a run or model directory, or a results file"),
])
def test_a_directory_without_results_is_told_the_command_that_gives_it_some(tmp_path, holds, fragment):
    directory = tmp_path / "d"
    for name, text in holds.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    with pytest.raises(ResultsError, match=re.escape(fragment.format(d=directory))):
        load_results(directory)


@pytest.mark.parametrize("name, content", [
    ("state.json", {"format": "fortify", "version": "1", "finished": True}),  # a training state
    ("model.json", {"name": "mlp", "input_shape": [64], "num_classes": 10}),  # a model card
    ("sweep.json", {"version": 1, "config": {}, "runs": []}),  # a sweep's summary
    ("config.yaml", "data: {name: digits}\n"),  # not JSON at all
])
def test_a_file_that_holds_no_results_is_named_for_what_it_is(tmp_path, name, content):
    (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ResultsError, match=f"{name} is not a results file.*: the results are a run's"):
        load_results(tmp_path / name)


def test_a_pipe_given_as_results_is_named_for_what_it_is(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ResultsError, match="pipe is neither a results file nor a directory"):
        load_results(tmp_path / "pipe")


def test_fortify_report_command_writes_the_page_and_fails_cleanly(run_dir, tmp_path):
    # Execute
    result = runner.invoke(app, ["report", str(run_dir)])
    # Assert
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file()
    bad = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "error:" in bad.output and isinstance(bad.exception, SystemExit)


def test_compare_merges_runs_and_refuses_different_threat_models(run_dir, tmp_path, run_results):
    # Prepare: a second run directory with the same results under another name
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(run_results))
    # Execute
    out = tmp_path / "cmp.html"
    result = runner.invoke(app, ["compare", str(run_dir), str(other), "--out", str(out)])
    # Assert
    assert result.exit_code == 0, result.output
    text = " ".join(_parse(out.read_text()).text)
    for name in ("run/standard", "run/pgd", "other/standard", "other/pgd"):
        assert name in text
    changed = json.loads(json.dumps(run_results))
    changed["threat"]["eps"] = 0.1
    (other / "results.json").write_text(json.dumps(changed))
    with pytest.raises(ResultsError, match="same threat model"):
        merge_runs([load_results(run_dir), load_results(other)])
    refused = runner.invoke(app, ["compare", str(run_dir), str(other), "--out", str(tmp_path / "x.html")])
    assert refused.exit_code == 2 and "same threat model" in refused.output


def test_compare_says_which_data_settings_differ_between_the_runs(tmp_path, run_results):
    # Prepare: a run, one whose test split was drawn with another seed, and one whose data lie elsewhere
    def run_with(name: str, **data: object):
        results = json.loads(json.dumps(run_results))
        results["config"]["data"] = {"name": "digits", "seed": 0, "cache_dir": "/cache", **data}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        return tmp_path / name

    first, reseeded = run_with("first"), run_with("reseeded", seed=1)
    relocated = run_with("moved", cache_dir="/b")
    # Execute
    out = tmp_path / "cmp.html"
    result = runner.invoke(app, ["compare", str(first), str(reseeded), "--out", str(out)])
    agreeing = merge_runs([load_results(first), load_results(relocated)])
    # Assert: one note, on the page, naming the setting and each run's value; none where only the
    # data's location differs, which decides no example
    assert result.exit_code == 0, result.output
    notes = [item for item in _parse(out.read_text()).text if "data.seed" in item]
    assert notes == ["the runs differ in data.seed (first 0, reseeded 1): their accuracies come from "
                     "different test examples"]
    assert "notes" not in agreeing


def test_the_report_of_a_model_directory_reads_the_audit_fortify_audit_wrote_there(tmp_path, run_results):
    # Prepare: `fortify evaluate` without --report (no privacy section), then `fortify audit`
    model_dir = tmp_path / "pgd"
    model_dir.mkdir()
    pgd = run_results["models"]["pgd"]
    evaluation = {"version": 2, "kind": "evaluation", "config": {"data": {"name": "digits"}},
                  "robustness": pgd["robustness"]}
    (model_dir / "robustness.json").write_text(json.dumps(evaluation))
    audit = {"version": 2, "kind": "privacy", "privacy": pgd["privacy"]}
    (model_dir / "privacy.json").write_text(json.dumps(audit))
    # Execute
    loaded = load_results(model_dir)
    html = render_report(loaded)
    # Assert: the audit is on the page, and no note says it is missing
    assert loaded["models"]["pgd"]["privacy"] == pgd["privacy"]
    assert 'id="privacy"' in html and "no privacy audit" not in html
    # an evaluation's own audit (evaluate --report) stays the one shown
    (model_dir / "robustness.json").write_text(json.dumps({**evaluation, "privacy": {**pgd["privacy"],
                                                                                     "warnings": ["own"]}}))
    assert load_results(model_dir)["models"]["pgd"]["privacy"]["warnings"] == ["own"]
    # a privacy.json the report cannot read is refused in one line, naming the file
    (model_dir / "robustness.json").write_text(json.dumps(evaluation))
    (model_dir / "privacy.json").write_text(json.dumps({"version": 2, "kind": "privacy"}))
    with pytest.raises(ResultsError, match="privacy.json"):
        load_results(model_dir)


def test_dp_tabular_and_precision_sections_render_from_their_result_objects(run_results, tmp_path):
    # Prepare: the dicts DP training and the tabular study put into results.json
    from dataclasses import asdict

    from fortify.privacy.canaries import CanaryAudit
    from fortify.tabular.changes import FeatureChanges
    from fortify.tabular.study import ConstraintStudy, SettingResult
    from fortify.training.dp import PrivacySpent

    results = json.loads(json.dumps(run_results))
    spent = PrivacySpent(accountant="prv", epsilon=3.25, delta=1e-5, noise_multiplier=1.1,
                         max_grad_norm=1.0, sample_rate=0.05, expected_batch_size=64.0,
                         max_physical_batch_size=None, steps=400, replaced_modules=["bn1"])
    audit = CanaryAudit(n_inserted=32, n_held_out=32, threshold=-1.0, tpr=0.6, fpr=0.1, tpr_low=0.4,
                        fpr_high=0.3, epsilon_lower=0.29, epsilon_upper=3.25, delta=1e-5,
                        confidence=0.95, auc=0.71)
    results["models"]["pgd"]["training"] |= {"privacy": asdict(spent), "canary_audit": audit.to_dict()}
    study = ConstraintStudy(n_examples=50, clean_accuracy=0.9, settings=[
        SettingResult("box", "linf eps=0.1", {"pgd-10": 0.31}, 0.31),
        SettingResult("schema", "constrained", {"pgd-10": 0.77}, 0.77)],
        feature_changes=[FeatureChanges("pgd-10", 10, {"age": 0, "income": 7, "loans": 3})])
    results["models"]["pgd"]["tabular"] = study.to_dict()
    from fortify.evaluation.precision import PrecisionCheck

    results["models"]["pgd"]["robustness"]["precision"] = asdict(PrecisionCheck(
        amp="bf16", examples=128, clean_agreement=0.992, attack="pgd-10", attacked=120,
        robust_agreement=0.975, min_agreement=0.9))
    (tmp_path / "results.json").write_text(json.dumps(results))
    # Execute: through load_results, whose field checks must accept what these objects write
    page = _parse(render_report(load_results(tmp_path)))
    text = " ".join(page.text)
    # Assert
    assert "Differential privacy" in text and "3.25" in text and "0.29" in text and "bn1" in text
    assert "trained without DP" not in text  # only the DP model is listed
    assert "Tabular constraints" in text and "31.0%" in text and "77.0%" in text
    assert "evaluated under bf16 autocast" in text and "99.2%" in text and "97.5%" in text
    assert "figure 'pgd feature changes' could not be drawn" not in text
    assert len(page.images) >= 11  # the feature-change chart joined the other figures


def test_report_of_a_dp_model_directory_shows_its_privacy_accounting(tmp_path):
    # Prepare: a DP-trained model directory, evaluated with --report
    model_dir = tmp_path / "dp"
    trained = runner.invoke(app, ["train", "--out", str(model_dir), "--objective", "standard",
                                  "--model", "mlp", "--epochs", "2", "--dp", "--noise-multiplier", "1.0",
                                  "--quiet"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(app, ["evaluate", str(model_dir), "--attacks", "fgsm", "--n-examples", "40",
                                    "--report"])
    assert evaluated.exit_code == 0, evaluated.output
    # Execute
    text = " ".join(_parse((model_dir / "report.html").read_text()).text)
    # Assert: the accountant's epsilon of training.json, per epoch, next to the robustness numbers
    training = json.loads((model_dir / "training.json").read_text())
    epsilons = [record["epsilon"] for record in training["history"]]
    assert "Differential privacy" in text and "epsilon after each epoch" in text
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]
    assert f"{epsilons[-1]:.3g}" in text
