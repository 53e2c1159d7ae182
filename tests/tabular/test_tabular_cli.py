"""The command line and pipeline on tables: a CSV with a target and schema, breast-cancer with
its bundled schema, and clear errors for a schema that does not fit the data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tabular_credit import credit_table, write_csv
from typer.testing import CliRunner

from fortify.attacks import PGD
from fortify.cli import app
from fortify.config import load_config
from fortify.pipeline import prepare
from fortify.tabular import ConstrainedThreatModel

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_train_and_evaluate_a_csv_with_target_and_schema(tmp_path, schema):
    # Prepare
    write_csv(tmp_path / "credit.csv", credit_table(300))
    (tmp_path / "schema.yaml").write_text(schema.to_yaml())
    out = tmp_path / "model"
    # Execute
    trained = _invoke("train", "--data", tmp_path / "credit.csv", "--target", "default", "--schema",
                      tmp_path / "schema.yaml", "--objective", "standard", "--epochs", "1", "--out", out,
                      "--quiet", "--device", "cpu")
    evaluated = _invoke("evaluate", out, "--attacks", "pgd,feature-search", "--n-examples", "20",
                        "--steps", "5", "--device", "cpu")
    # Assert: the threat model is the constrained one, and the tabular study sits in the results
    assert trained.exit_code == 0, trained.output
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((out / "robustness.json").read_text())
    assert results["robustness"]["n_examples"] == 20
    assert {s["setting"] for s in results["tabular"]["settings"]} == {"box", "types", "schema"}
    for changes in results["tabular"]["feature_changes"]:
        assert list(changes["counts"]) == schema.names
        assert changes["counts"]["age"] == 0 and changes["counts"]["late_payments"] == 0


def _train_on(table, tmp_path):
    """A standard model trained for one epoch on ``table`` (no schema file), and its input encoding."""
    write_csv(tmp_path / "credit.csv", table)
    out = tmp_path / "model"
    trained = _invoke("train", "--data", tmp_path / "credit.csv", "--target", "default", "--objective",
                      "standard", "--epochs", "1", "--out", out, "--quiet", "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    return out, json.loads((out / "model.json").read_text())["input_encoding"]


def test_another_table_is_read_with_the_models_encoding_and_a_schema_of_its_own_is_refused(tmp_path):
    # Prepare: a model trained without a schema file (bounds fitted on its rows), then the same rows
    # with the columns in another order, and rows of the same distribution whose own range differs
    table = credit_table(120)
    out, encoding = _train_on(table, tmp_path)
    assert list(encoding["features"]) == [c for c in table if c != "default"]
    assert encoding["fitted_bounds"]["age"] == ["low", "high"]
    write_csv(tmp_path / "reordered.csv", dict(reversed(list(table.items()))))
    other = credit_table(120, seed=1)
    write_csv(tmp_path / "other.csv", other)
    fitted = {name: sides for name, sides in encoding["fitted_bounds"].items() if name != "age"}
    refitted = {**encoding, "fitted_bounds": fitted}
    refitted["features"]["age"] = {**encoding["features"]["age"], "low": float(min(other["age"])),
                                   "high": float(max(other["age"]))}
    (tmp_path / "refitted.yaml").write_text(yaml.safe_dump(refitted, sort_keys=False))

    def evaluate_on(csv, **schema):
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"data": {"path": str(csv), **schema}}))
        result = _invoke("evaluate", out, "--config", tmp_path / "other.yaml", "--attacks", "fgsm",
                         "--n-examples", "10", "--device", "cpu")
        accuracy = json.loads((out / "robustness.json").read_text())["robustness"]["clean_accuracy"] \
            if result.exit_code == 0 else None
        return result, accuracy

    # Execute
    (own, own_accuracy), (reordered, reordered_accuracy) = (evaluate_on(tmp_path / f"{name}.csv")
                                                            for name in ("credit", "reordered"))
    other_rows, _ = evaluate_on(tmp_path / "other.csv")
    own_schema, _ = evaluate_on(tmp_path / "other.csv", feature_schema=str(tmp_path / "refitted.yaml"))

    # Assert: the reordered rows are the same inputs to the model; rows beyond the fitted bounds are
    # clipped to them, as in training; a schema that encodes otherwise is refused by name
    assert own.exit_code == 0 and reordered.exit_code == 0, reordered.output
    assert reordered_accuracy == own_accuracy
    assert other_rows.exit_code == 0, other_rows.output
    assert own_schema.exit_code == 2 and isinstance(own_schema.exception, SystemExit)
    assert "encoded otherwise than the data" in own_schema.output
    assert "feature 'age' is encoded as" in own_schema.output


def test_a_schema_that_does_not_fit_the_csv_exits_cleanly(tmp_path, schema):
    write_csv(tmp_path / "credit.csv", credit_table(60))
    spec = yaml.safe_load(schema.to_yaml())
    spec["features"]["age"]["low"] = 30  # bounds that exclude some of the data
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(spec))
    result = _invoke("train", "--data", tmp_path / "credit.csv", "--schema", tmp_path / "schema.yaml",
                     "--epochs", "1", "--out", tmp_path / "never", "--quiet")
    assert result.exit_code == 2, result.output
    assert "feature 'age'" in result.output and "outside the schema bounds [30, 80]" in result.output
    assert isinstance(result.exception, SystemExit) and not (tmp_path / "never").exists()


def test_breast_cancer_with_its_bundled_schema_keeps_size_measurements_fixed():
    # Prepare: the bundled schema through the same path the CLI takes
    config = load_config(None, {"data": {"name": "breast-cancer", "feature_schema": "breast-cancer"},
                                "threat": {"eps": 0.1}})
    setup = prepare(config, "cpu")
    threat = setup.threat
    assert isinstance(threat, ConstrainedThreatModel)
    immutable = [f.name for f in threat.schema.features if not f.mutable]
    sizes = ("radius", "perimeter", "area")
    assert len(immutable) == 9 and all(any(s in n for s in sizes) for n in immutable)
    # Execute: PGD on an untrained model over the test split
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = setup.dataset.test.x, setup.dataset.test.y
    x_adv = PGD(threat, steps=5)(model, x, y)
    # Assert: size columns untouched, others moved at most eps
    columns = [i for i, f in enumerate(threat.schema.features) if not f.mutable]
    assert torch.equal(x_adv[:, columns], x[:, columns])
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and float((x_adv - x).abs().max()) > 0.05


@pytest.mark.parametrize("name, fragment", [
    ("no-such-schema", "neither a file nor a bundled schema; bundled: breast-cancer"),
    # the csv reader infers its own schema when given no file; the bundled name would vanish
    ("breast-cancer", "schema 'breast-cancer' is bundled for its own dataset"),
])
def test_a_schema_name_a_csv_cannot_use_is_refused(tmp_path, name, fragment):
    write_csv(tmp_path / "credit.csv", credit_table(60))
    result = _invoke("train", "--data", tmp_path / "credit.csv", "--target", "default", "--schema",
                     name, "--epochs", "1", "--out", tmp_path / "never", "--quiet")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert isinstance(result.exception, SystemExit) and not (tmp_path / "never").exists()


def test_the_classes_belong_to_the_encoding_a_model_checks(tmp_path):
    # Prepare: a model trained on a yes/no target; the same rows relabelled granted/denied (two
    # classes again, so the class count alone cannot tell), and a file of 'yes' rows only
    table = credit_table(120)
    table["default"] = ["yes" if v else "no" for v in table["default"]]
    out, encoding = _train_on(table, tmp_path)
    assert encoding["classes"] == ["no", "yes"]
    write_csv(tmp_path / "relabelled.csv",
              {**table, "default": ["granted" if v == "no" else "denied" for v in table["default"]]})
    yes_rows = [i for i, v in enumerate(table["default"]) if v == "yes"]
    write_csv(tmp_path / "yes.csv", {k: [v[i] for i in yes_rows] for k, v in table.items()})
    (tmp_path / "trained.yaml").write_text(json.dumps(encoding))  # JSON is YAML, in the model's order

    def evaluate_on(csv, **schema):
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"data": {"path": str(csv), **schema}}))
        return _invoke("evaluate", out, "--config", tmp_path / "other.yaml", "--attacks", "fgsm",
                       "--n-examples", "10", "--device", "cpu")

    # Execute
    relabelled = evaluate_on(tmp_path / "relabelled.csv")
    yes_only = evaluate_on(tmp_path / "yes.csv", feature_schema=str(tmp_path / "trained.yaml"))

    # Assert: relabelled classes are refused by name; with the model's encoding as the schema, a file
    # of one class is read with the model's two classes, every label 'yes' = 1
    assert relabelled.exit_code == 2 and isinstance(relabelled.exception, SystemExit)
    assert "'denied' is not one of the schema's classes: no, yes" in relabelled.output
    assert yes_only.exit_code == 0, yes_only.output
    results = json.loads((out / "robustness.json").read_text())
    assert results["robustness"]["n_examples"] == 10
