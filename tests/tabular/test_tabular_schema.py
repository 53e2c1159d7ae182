"""Schemas: encoding, YAML round trip, inference from a CSV, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
import yaml
from tabular_credit import credit_table, write_csv

from fortify.config import read_yaml_mapping
from fortify.data import load_dataset
from fortify.errors import ConfigError, DataError
from fortify.tabular import Feature, Schema, TableOptions
from fortify.tabular.csv import infer_schema, read_table
from fortify.tabular.schema import SchemaSpec, load_schema, read_schema_spec


def test_encode_scales_numbers_by_bounds_and_one_hots_categories(schema):
    table = credit_table(5)
    table["age"][0], table["income"][0], table["housing"][0] = 49, 50_000, "rent"
    x = schema.encode(table)
    assert x.shape == (5, schema.n_columns) == (5, 14)
    assert x[0, 0].item() == pytest.approx((49 - 18) / 62)
    assert x[0, 1].item() == pytest.approx(0.25)
    housing = schema.columns(schema.names.index("housing"))
    assert x[0, housing].tolist() == [0.0, 1.0, 0.0]
    schema.check_encoded(x)  # a fresh encoding is valid


def test_schema_round_trips_through_yaml(schema):
    again = Schema.from_dict(yaml.safe_load(schema.to_yaml()))
    assert again == schema
    assert again.column_names() == schema.column_names()


@pytest.mark.parametrize(("change", "fragment"), [
    (("housing", "castle"), "category 'castle' is not in the schema; allowed: own, rent, other"),
    (("age", 12), "feature 'age', row 0: value 12 is outside the schema bounds [18, 80]"),
    (("accounts", 2.5), "feature 'accounts', row 0: value 2.5 is not a whole number"),
    (("income", "lots"), "feature 'income', row 0: 'lots' is not a number"),
])
def test_bad_values_name_the_column_and_the_value(schema, change, fragment):
    table = credit_table(3)
    column, value = change
    table[column][0] = value
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        schema.encode(table)


def test_columns_of_different_lengths_are_refused_with_their_lengths(schema):
    table = credit_table(3)
    table["income"] = table["income"][:2]
    with pytest.raises(DataError, match="columns differ in length: .*'age': 3, 'income': 2"):
        schema.encode(table)


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"type": "text"}, "unknown type 'text'; valid types: continuous, integer, binary, categorical"),
    ({"type": "categorical", "categories": ["a", "b"], "direction": "increase"}, "numeric features only"),
    ({"type": "integer", "low": 0.5, "high": 3}, "whole bounds"),
    ({"type": "continuous", "low": 2, "high": 1}, "low < high"),
    ({"type": "continuous", "low": 0, "high": 1, "cost": 0}, "cost must be a finite number > 0"),
    ({"type": "binary", "direction": "sideways"}, "valid directions: any, increase, decrease"),
    ({"type": "continuous", "low": -1e308, "high": 1e308}, "wider than a float can hold"),
    ({"type": "integer", "low": 0, "high": 2 ** 21 + 1}, "spans at most 2,097,152 whole numbers"),
])
def test_bad_feature_settings_are_config_errors(settings, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Feature(name="f", **settings)


def test_encoded_inputs_that_break_the_schema_are_refused(schema):
    x = schema.encode(credit_table(4))
    broken = x.clone()
    broken[2, 2] += 0.01  # accounts is a whole number: 0.01 of its range is a fifth of an account
    with pytest.raises(DataError, match="feature 'accounts', row 2: not a whole number"):
        schema.check_encoded(broken)
    broken = x.clone()
    broken[1, 4:7] = torch.tensor([1.0, 1.0, 0.0])
    with pytest.raises(DataError, match="feature 'housing', row 1: not one-hot"):
        schema.check_encoded(broken)


@pytest.mark.parametrize("span", [100_000, 600_000, 2 ** 21])
def test_a_half_step_of_a_wide_integer_is_refused_and_a_whole_one_kept(span):
    # the slack on the grid once grew with the span past half a step (from a span of about 524,288)
    wide = Schema((Feature("income", "integer", 0, span), Feature("rate", "continuous", 0, 1)))
    x = wide.encode({"income": [12_345], "rate": [0.5]})
    whole, half = x.clone(), x.clone()
    whole[0, 0] += 1 / span
    half[0, 0] += 0.5 / span
    wide.check_encoded(whole)
    with pytest.raises(DataError, match="not a whole number"):
        wide.check_encoded(half)


@pytest.mark.parametrize("column", [0, 1, 2])
def test_encoded_inputs_with_a_nan_are_refused(column):
    numeric = Schema((Feature("a", "continuous", 0, 1), Feature("n", "integer", 0, 5),
                      Feature("b", "binary")))
    x = torch.tensor([[0.5, 0.4, 1.0]])
    x[0, column] = float("nan")
    name = numeric.features[column].name
    with pytest.raises(DataError, match=f"feature '{name}', row 0: not a finite number"):
        numeric.check_encoded(x)


def test_a_whole_number_column_wider_than_float32_resolves_is_inferred_continuous(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("income,label\n" + "".join(f"{i * 1_000_000},{i % 2}\n" for i in range(10)))
    schema = infer_schema(read_table(path), "label")
    assert schema.feature("income").type == "continuous"


def test_inference_types_columns_and_keeps_given_settings(tmp_path):
    write_csv(tmp_path / "credit.csv", credit_table(200))
    table = read_table(tmp_path / "credit.csv")
    spec = SchemaSpec({"age": {"mutable": False}, "accounts": {"direction": "increase"}}, infer_missing=True)
    schema = infer_schema(table, "default", spec)
    types = {f.name: f.type for f in schema.features}
    assert types["age"] == types["accounts"] == "integer"
    assert types["guarantor"] == "binary" and types["housing"] == "categorical"
    assert types["income"] == "continuous"
    assert not schema.feature("age").mutable and schema.feature("accounts").direction == "increase"
    assert schema.feature("housing").categories == ("other", "own", "rent")
    ages = [float(a) for a in table["age"]]
    assert (schema.feature("age").low, schema.feature("age").high) == (min(ages), max(ages))


def test_categories_given_as_null_are_inferred_from_the_column(tmp_path):
    write_csv(tmp_path / "credit.csv", credit_table(200))
    table = read_table(tmp_path / "credit.csv")
    spec = SchemaSpec.from_dict({"infer_missing": True,
                                 "features": {"housing": {"type": "categorical", "categories": None}}})
    assert infer_schema(table, "default", spec).feature("housing").categories == ("other", "own", "rent")


def test_a_schema_that_does_not_match_the_columns_is_refused(tmp_path):
    write_csv(tmp_path / "credit.csv", credit_table(50))
    table = read_table(tmp_path / "credit.csv")
    with pytest.raises(DataError, match=r"schema feature\(s\) \['salary'\] are not columns of the data"):
        infer_schema(table, "default", SchemaSpec({"salary": {"type": "binary"}}, infer_missing=True))
    with pytest.raises(DataError, match=r"data column\(s\) \['income', .*are not in the schema"):
        infer_schema(table, "default", SchemaSpec({"age": {}}))


def test_csv_dataset_loads_with_schema_file_and_target(tmp_path, schema):
    write_csv(tmp_path / "credit.csv", credit_table(300))
    (tmp_path / "schema.yaml").write_text(schema.to_yaml())
    dataset = load_dataset("csv", TableOptions(path=tmp_path / "credit.csv", schema=tmp_path / "schema.yaml"))
    assert dataset.num_classes == 2 and dataset.input_shape == (schema.n_columns,)
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 300
    assert Schema.from_dict(dataset.metadata["schema"]) == schema
    with pytest.raises(DataError, match="target column 'label' is not in the data"):
        load_dataset("csv", TableOptions(path=tmp_path / "credit.csv", target="label"))


@pytest.mark.parametrize("read, kind", [(read_schema_spec, "schema"), (read_yaml_mapping, "config")])
def test_unreadable_or_malformed_yaml_files_name_the_file_and_its_kind(tmp_path, read, kind):
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{kind} file .*broken.yaml is not valid YAML"):
        read(broken)
    with pytest.raises(ConfigError, match=f"cannot read {kind} file .*missing.yaml"):
        read(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, fragment", [
    ("features: {housing: {type: categorical, categories: [yes, no]}}", "category True is a YAML boolean"),
    ("classes: [on, off]\nfeatures: {age: {type: integer, low: 0, high: 1}}", "class True is a YAML boolean"),
    ("classes: [a]\nfeatures: {age: {type: integer, low: 0, high: 1}}", "at least two classes"),
    ("classes: a\nfeatures: {age: {type: integer, low: 0, high: 1}}", "classes must be a list"),
    ("features: {housing: {type: categorical, categories: own}}", "categories must be a list"),
    ("features: {housing: {type: categorical, categories: 5}}", "categories must be a list"),
    ("features: {housing: {type: categorical, categories: {a: 1, b: 2}}}", "categories must be a list"),
])
def test_categories_and_classes_yaml_would_misread_are_refused(tmp_path, text, fragment):
    # YAML 1.1 reads unquoted yes/no/on/off as booleans: 'yes' in the CSV would match no category
    path = tmp_path / "schema.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=fragment):
        load_schema(path)


def test_quoted_yes_and_no_are_categories(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text("features: {housing: {type: categorical, categories: ['yes', 'no']}}\n")
    assert load_schema(path).feature("housing").categories == ("yes", "no")
