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


def test_a_table_encoded_otherwise_than_in_training_is_refused_by_name(tmp_path, schema):
    # Prepare: a model trained without a schema file (bounds fitted on its rows), then the same rows
    # with the columns in another order, and rows of the same distribution that refit other bounds
    table = credit_table(120)
    write_csv(tmp_path / "credit.csv", table)
    out = tmp_path / "model"
    trained = _invoke("train", "--data", tmp_path / "credit.csv", "--target", "default", "--objective",
                      "standard", "--epochs", "1", "--out", out, "--quiet", "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    encoding = json.loads((out / "model.json").read_text())["input_encoding"]
    assert list(encoding["features"]) == [c for c in table if c != "default"]
    write_csv(tmp_path / "reordered.csv", dict(reversed(list(table.items()))))
    write_csv(tmp_path / "other.csv", credit_table(120, seed=1))

    def evaluate_on(csv):
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"data": {"path": str(csv)}}))
        return _invoke("evaluate", out, "--config", tmp_path / "other.yaml", "--attacks", "fgsm",
                       "--n-examples", "10", "--device", "cpu")

    # Execute / Assert: a clean error naming what differs, instead of permuted or rescaled features
    reordered = evaluate_on(tmp_path / "reordered.csv")
    assert reordered.exit_code == 2 and "Traceback" not in reordered.output
    assert "encoded otherwise than the data" in reordered.output and "its columns are" in reordered.output
    refitted = evaluate_on(tmp_path / "other.csv")
    assert refitted.exit_code == 2 and "feature 'age' is encoded as" in refitted.output
    assert evaluate_on(tmp_path / "credit.csv").exit_code == 0


def test_a_schema_that_does_not_fit_the_csv_exits_cleanly(tmp_path, schema):
    write_csv(tmp_path / "credit.csv", credit_table(60))
    spec = yaml.safe_load(schema.to_yaml())
    spec["features"]["age"]["low"] = 30  # bounds that exclude some of the data
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(spec))
    result = _invoke("train", "--data", tmp_path / "credit.csv", "--schema", tmp_path / "schema.yaml",
                     "--epochs", "1", "--out", tmp_path / "never", "--quiet")
    assert result.exit_code == 2, result.output
    assert "feature 'age'" in result.output and "outside the schema bounds [30, 80]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()


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
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()
