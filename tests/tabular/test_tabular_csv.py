"""Reading a CSV without a schema: odd cells in numeric columns, and files that are not UTF-8 text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fortify.data import load_dataset
from fortify.data.base import split_indices
from fortify.errors import ConfigError, DataError
from fortify.tabular import TableOptions
from fortify.tabular.csv import infer_schema, read_table
from fortify.tabular.schema import Schema, SchemaSpec


def write_table(path: Path, income: list[str]) -> Path:
    """A table of ``len(income)`` rows: an integer age, the given income cells and a 0/1 label."""
    lines = ["age,income,label"] + [f"{20 + i},{cell},{i % 2}" for i, cell in enumerate(income)]
    path.write_text("\n".join(lines) + "\n")
    return path


def incomes(n: int, odd: dict[int, str]) -> list[str]:
    return [odd.get(i, f"{100 + 7.5 * i}") for i in range(n)]


def csv_error(path: Path, **options) -> str:
    with pytest.raises(DataError) as caught:
        load_dataset("csv", TableOptions(path=path, **options))
    return str(caught.value)


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf"])
def test_a_non_finite_cell_in_a_numeric_column_is_refused(cell, tmp_path):
    # Prepare
    path = write_table(tmp_path / "t.csv", incomes(30, {3: cell}))

    # Execute
    message = csv_error(path, target="label")

    # Assert
    assert f"column 'income', data row 3: '{cell}' is not a finite number" in message


def test_a_text_cell_in_a_mostly_numeric_column_is_refused_with_the_schema_way_out(tmp_path):
    # Prepare: one cell in 30 is text, so without the check income would become a 29-way one-hot
    path = write_table(tmp_path / "t.csv", incomes(30, {4: "abc", 9: "n/a"}))

    # Execute
    message = csv_error(path, target="label")

    # Assert
    assert "column 'income', data row 4: 'abc' is not a number, but 93% of the column is numbers" in message
    assert "categorical in a schema file" in message


def test_nine_numbers_in_ten_make_a_numeric_column(tmp_path):
    # Prepare: the threshold is 90% numbers
    table = read_table(write_table(tmp_path / "t.csv", incomes(10, {0: "text0"})))

    # Execute
    with pytest.raises(DataError) as caught:
        infer_schema(table, "label")

    # Assert
    assert "column 'income', data row 0: 'text0' is not a number" in str(caught.value)


def test_eight_numbers_in_ten_make_a_categorical_column(tmp_path):
    # Prepare
    table = read_table(write_table(tmp_path / "t.csv", incomes(10, {0: "text0", 1: "text1"})))

    # Execute
    schema = infer_schema(table, "label")

    # Assert
    assert schema.feature("income").type == "categorical" and schema.feature("income").width == 10


def test_a_mostly_text_column_stays_categorical(tmp_path):
    # Prepare: numbers among the categories do not make the column numeric
    path = write_table(tmp_path / "t.csv", ["own", "rent", "3", "other", "own", "12", "rent", "own"] * 3)

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label"))

    # Assert
    income = Schema.from_dict(dataset.metadata["schema"]).feature("income")
    assert income.type == "categorical" and income.categories == ("12", "3", "other", "own", "rent")
    assert dataset.input_shape == (1 + 5,)


def test_a_schema_that_declares_the_column_keeps_the_old_behaviour(tmp_path):
    # Prepare
    table = read_table(write_table(tmp_path / "t.csv", incomes(30, {4: "abc"})))
    declared = SchemaSpec({"income": {"type": "categorical"}}, infer_missing=True)
    other = SchemaSpec({"age": {"type": "integer"}}, infer_missing=True)

    # Execute
    schema = infer_schema(table, "label", declared)

    # Assert: declared categorical it loads; left to inference it is still refused
    assert schema.feature("income").type == "categorical" and schema.feature("income").width == 30
    with pytest.raises(DataError, match="column 'income', data row 4: 'abc' is not a number"):
        infer_schema(table, "label", other)


@pytest.mark.parametrize("target", ["label", None])
def test_a_file_that_is_not_utf8_is_a_data_error(target, tmp_path):
    # Prepare: Latin-1 text; without a target the header alone is read, for the error message
    path = tmp_path / "latin1.csv"
    path.write_bytes("name,label\nJos\xe9,1\nM\xfcller,0\n".encode("latin-1"))

    # Execute
    message = csv_error(path, target=target)

    # Assert
    assert str(path) in message and "is not UTF-8 text (cannot decode byte 0xe9)" in message


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    # Prepare: Excel writes UTF-8 CSVs with a BOM
    path = tmp_path / "excel.csv"
    path.write_text("label,age\n" + "".join(f"{i % 2},{20 + i}\n" for i in range(20)), encoding="utf-8-sig")

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label"))

    # Assert
    assert dataset.num_classes == 2 and dataset.metadata["feature_names"] == ["age"]


def test_a_field_over_the_csv_limit_is_a_data_error(tmp_path):
    # Prepare
    path = tmp_path / "big.csv"
    path.write_text("a,label\n" + "x" * 200_000 + ",1\n1,0\n")

    # Execute
    message = csv_error(path, target="label")

    # Assert
    assert f"{path}, line 2: not valid CSV" in message


def test_blank_lines_do_not_shift_the_row_numbers_of_errors(tmp_path):
    # the reader's own errors and the type checks must name the same row for the same cell
    path = write_table(tmp_path / "t.csv", incomes(30, {3: "nan"}))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "", *lines[1:3], "", *lines[3:]]) + "\n")
    assert "data row 3: 'nan'" in csv_error(path, target="label")
    lines = path.read_text().splitlines()
    lines[lines.index(next(line for line in lines if ",nan," in line))] = "23,,1"  # the same row, emptied
    path.write_text("\n".join(lines) + "\n")
    assert "data row 3: column 'income' is empty" in csv_error(path, target="label")


# -- bounds and categories come from the training rows -----------------------------------------

N_ROWS = 40
TRAIN_ROWS, VAL_ROWS, TEST_ROWS = (index.tolist() for index in split_indices(N_ROWS, 0.1, 0.2, 0))


def write_mixed_table(path: Path, income: dict[int, str] | None = None,
                      housing: dict[int, str] | None = None) -> Path:
    """``N_ROWS`` rows of an integer age, a continuous income, a housing category and a 0/1 label,
    with the given cells (data row -> value) replaced."""
    income, housing = income or {}, housing or {}
    lines = ["age,income,housing,label"] + [
        f"{20 + i},{income.get(i, 100 + 7.5 * i)},{housing.get(i, ('own', 'rent')[i % 2])},{i % 2}"
        for i in range(N_ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_category_met_only_outside_the_training_rows_is_refused(tmp_path):
    # Prepare: one validation row holds a housing category no training row has
    row = VAL_ROWS[0]
    path = write_mixed_table(tmp_path / "t.csv", housing={row: "boat"})

    # Execute
    message = csv_error(path, target="label")

    # Assert: the column, the row, the value and the split are named, with the way out
    assert f"column 'housing', data row {row}: category 'boat' appears in the val split" in message
    assert "in no training row" in message and "schema file" in message


def test_a_schema_that_lists_the_category_keeps_it(tmp_path):
    # Prepare
    path = write_mixed_table(tmp_path / "t.csv", housing={VAL_ROWS[0]: "boat"})
    schema = tmp_path / "schema.yaml"
    schema.write_text("infer_missing: true\nfeatures:\n  housing: {type: categorical, "
                      "categories: [own, rent, boat]}\n")

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label", schema=schema))

    # Assert
    assert "housing=boat" in dataset.metadata["feature_names"]


def test_numeric_bounds_are_the_training_rows_range_and_extremes_are_clipped(tmp_path):
    # Prepare: the same table twice, the second with a huge income in one test row
    plain = load_dataset("csv", TableOptions(path=write_mixed_table(tmp_path / "a.csv"), target="label"))
    row = TEST_ROWS[0]
    path = write_mixed_table(tmp_path / "b.csv", income={row: "1e9"})

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label"))

    # Assert: the bounds are the training rows' own, the training inputs do not move, the extreme
    # is clipped to the top of the range and counted
    income = Schema.from_dict(dataset.metadata["schema"]).feature("income")
    assert (income.low, income.high) == (min(100 + 7.5 * i for i in TRAIN_ROWS),
                                         max(100 + 7.5 * i for i in TRAIN_ROWS))
    assert torch.equal(dataset.train.x, plain.train.x)
    assert float(dataset.test.x[0, 1]) == 1.0
    was_clipped = plain.metadata["clipped"]
    assert dataset.metadata["clipped"] == {**was_clipped, "test": was_clipped["test"] + 1}
    for split in (dataset.train, dataset.val, dataset.test):
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0


def test_bounds_a_schema_gives_are_not_clipped_to(tmp_path):
    # Prepare: a test income above the high bound the schema states
    path = write_mixed_table(tmp_path / "t.csv", income={TEST_ROWS[0]: "1e9"})
    schema = tmp_path / "schema.yaml"
    schema.write_text("infer_missing: true\nfeatures:\n  income: {type: continuous, low: 0, high: 1000}\n")

    # Execute
    message = csv_error(path, target="label", schema=schema)

    # Assert
    assert f"feature 'income', row {TEST_ROWS[0]}: value 1e+09 is outside the schema bounds" in message


@pytest.mark.parametrize("cell, fragment", [("inf", "value 'inf' is not finite"),
                                             ("abc", "'abc' is not a number (the schema says continuous)")])
def test_a_bad_cell_in_a_column_of_fitted_bounds_a_schema_gives_is_refused(cell, fragment, tmp_path):
    # a model card's input encoding gives the bounds and says they were fitted, so the column is
    # clipped without being inferred; inf was clipped to the top and text crashed the clipping
    path = write_mixed_table(tmp_path / "t.csv", income={TEST_ROWS[0]: cell})
    spec = SchemaSpec.from_dict({"fitted_bounds": {"income": ["low", "high"]}, "infer_missing": True,
                                 "features": {"income": {"type": "continuous", "low": 0, "high": 500}}})
    message = csv_error(path, target="label", schema=spec)
    assert f"feature 'income', row {TEST_ROWS[0]}: {fragment}" in message


# -- the target's classes --------------------------------------------------------------------------

def write_labelled(path: Path, labels: list[str]) -> Path:
    lines = ["age,label"] + [f"{20 + i},{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def all_labels(dataset) -> list[int]:
    return torch.cat([dataset.train.y, dataset.val.y, dataset.test.y]).tolist()


def test_numeric_labels_spelled_two_ways_are_one_class_in_numeric_order(tmp_path):
    # Prepare: 10 and 2 sort as numbers (2 before 10); 1 and 1.0 are the same number
    labels = ["1", "1.0", "10", "2", "2.00", "1"] * 5
    path = write_labelled(tmp_path / "t.csv", labels)

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label"))

    # Assert: three classes named by their shortest spelling, every cell under its number's index
    assert dataset.class_names == ["1", "2", "10"] and dataset.num_classes == 3
    assert sorted(all_labels(dataset)) == sorted([{"1": 0, "1.0": 0, "2": 1, "2.00": 1, "10": 2}[v]
                                                  for v in labels])
    assert dataset.metadata["schema"]["classes"] == ["1", "2", "10"]


def test_the_schemas_classes_fix_the_indices_even_for_a_subset_of_them(tmp_path):
    # Prepare: a file holding only two of the three classes the schema lists, in its own order; the
    # ten 'rent' rows are the youngest (ages 20-29)
    path = write_labelled(tmp_path / "t.csv", ["rent"] * 10 + ["own"] * 10)
    schema = tmp_path / "schema.yaml"
    schema.write_text("classes: [rent, other, own]\ninfer_missing: true\nfeatures: {age: {type: integer}}\n")

    # Execute
    dataset = load_dataset("csv", TableOptions(path=path, target="label", schema=schema))

    # Assert: inferred classes would be [own, rent] with own = 0
    assert dataset.num_classes == 3 and dataset.class_names == ["rent", "other", "own"]
    assert sorted(all_labels(dataset)) == [0] * 10 + [2] * 10
    age, y = dataset.train.x[:, 0], dataset.train.y
    assert age[y == 0].max() < age[y == 2].min()


def test_a_label_the_schemas_classes_lack_is_refused_with_the_classes(tmp_path):
    path = write_labelled(tmp_path / "t.csv", ["own", "rent", "boat"] * 4)
    schema = tmp_path / "schema.yaml"
    schema.write_text("classes: [own, rent]\ninfer_missing: true\nfeatures: {age: {type: integer}}\n")
    message = csv_error(path, target="label", schema=schema)
    assert "row 2: 'boat' is not one of the schema's classes: own, rent" in message


@pytest.mark.parametrize("label", ["nan", "NaN", "inf", "-inf"])
def test_a_missing_or_infinite_label_is_refused(label, tmp_path):
    path = write_labelled(tmp_path / "t.csv", ["0", "1"] * 10 + [label])
    assert f"row 20: '{label}' is not a label; fill or drop rows" in csv_error(path, target="label")


def test_a_class_only_outside_the_training_rows_is_refused_unless_a_schema_lists_it(tmp_path):
    # Prepare: one test row carries a third class
    labels = [("a", "b")[i % 2] for i in range(N_ROWS)]
    labels[TEST_ROWS[0]] = "c"
    path = write_labelled(tmp_path / "t.csv", labels)
    schema = tmp_path / "schema.yaml"
    schema.write_text("classes: [a, b, c]\ninfer_missing: true\nfeatures: {age: {type: integer}}\n")
    # Execute / Assert
    message = csv_error(path, target="label")
    assert f"data row {TEST_ROWS[0]}: class 'c' appears in the test split but in no training row" in message
    assert load_dataset("csv", TableOptions(path=path, target="label", schema=schema)).num_classes == 3


def test_a_target_other_than_the_schemas_is_refused(tmp_path):
    path = write_mixed_table(tmp_path / "t.csv")
    schema = tmp_path / "schema.yaml"
    schema.write_text("target: label\ninfer_missing: true\nfeatures: {age: {type: integer}}\n")
    with pytest.raises(ConfigError, match="--target 'housing' differs from the schema's target 'label'"):
        load_dataset("csv", TableOptions(path=path, target="housing", schema=schema))


def test_a_category_column_with_one_value_in_the_training_rows_says_why(tmp_path):
    # Feature's own check had answered "needs at least two distinct categories, got ['own']", naming
    # neither the rows outside training that held the other value nor what to do
    only_elsewhere = {row: "own" for row in range(N_ROWS)} | {row: "boat" for row in VAL_ROWS + TEST_ROWS}
    message = csv_error(write_mixed_table(tmp_path / "a.csv", housing=only_elsewhere), target="label")
    assert "column 'housing': the training rows hold only ['own'], and ['boat'] appear only in " \
           "validation or test rows" in message and "schema file" in message
    constant = {row: "own" for row in range(N_ROWS)}
    message = csv_error(write_mixed_table(tmp_path / "b.csv", housing=constant), target="label")
    assert "column 'housing' holds one value ('own') in every row" in message


def test_quotes_after_a_comma_and_space_delimit_the_field(tmp_path):
    # read as part of the value, they made '"own"' a category and '"3.0"' text in a numeric column
    plain = write_mixed_table(tmp_path / "plain.csv")
    spaced = tmp_path / "spaced.csv"
    lines = plain.read_text().splitlines()
    spaced.write_text("\n".join([lines[0]] + [", ".join(f'"{cell}"' for cell in line.split(","))
                                              for line in lines[1:]]) + "\n")
    a, b = (load_dataset("csv", TableOptions(path=p, target="label")) for p in (plain, spaced))
    assert a.metadata["feature_names"] == b.metadata["feature_names"]
    assert torch.equal(a.train.x, b.train.x)


@pytest.mark.parametrize("marker", ["NA", "n/a", "null", "?"])
def test_numbers_with_missing_value_markers_are_refused_not_made_categories(marker, tmp_path):
    # 15% NA made the column categorical: one-hot columns income=...=NA, the numbers' order lost
    path = write_mixed_table(tmp_path / "t.csv", income={row: marker for row in range(0, N_ROWS, 7)})
    message = csv_error(path, target="label")
    assert "column 'income' holds numbers and" in message and f"'{marker}'" in message
