"""Any CSV with a target column as a dataset (registered as ``csv``), its schema inferred or given.

Without a schema file every column but the target is inferred: numbers that are all whole are
``integer`` (``binary`` when they are all 0 or 1), other numbers ``continuous``, anything else
``categorical``. A column that is mostly numbers (``NUMERIC_SHARE``) but holds NaN, Inf or a few
text cells is refused rather than turned into categories. Types and these checks see every row:
they say how to read each cell. Bounds and categories are fitted on the training rows alone, so no
statistic of the validation or test rows reaches the model. Bounds are the training rows' minimum
and maximum (a constant column gets ``[v, v + 1]``); a validation or test value outside them is
clipped into them, and ``clipped`` in the metadata counts such values per split. Categories are
the training rows' distinct values; a category met only in validation or test rows is refused (the
model would have a column it never saw set) unless a schema file lists it. Every feature is
mutable in any direction at cost 1. A schema file overrides this per feature; each key it leaves
out is inferred. Bounds and categories it gives are never clipped to: a value outside them is
refused. With ``infer_missing: false`` (the default) the schema must name every column, so a
schema written for another table fails. The file must be UTF-8 text (a leading byte-order mark is
allowed).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fortify.data.base import Dataset, Split, split_indices
from fortify.data.registry import DATASETS, DataOptions
from fortify.errors import ConfigError, DataError
from fortify.tabular.schema import (
    MAX_INTEGER_SPAN,
    Feature,
    Schema,
    SchemaSpec,
    parse_number,
    read_schema_spec,
)

Table = dict[str, list[str]]

# Without a schema, a column is numeric when at least this share of its cells are numbers: its few
# other cells are then typos or missing-value markers, not categories worth a one-hot column each.
NUMERIC_SHARE = 0.9


@dataclass(frozen=True)
class TableOptions(DataOptions):
    """DataOptions plus what a table needs: the target column and an optional schema file."""

    target: str | None = None
    schema: Path | str | SchemaSpec | None = None


@DATASETS.register("csv")
def load_csv(options: DataOptions) -> Dataset:
    path = _require_file(options.path)
    spec = _schema_spec(getattr(options, "schema", None))
    target = getattr(options, "target", None) or (spec.target if spec else None)
    if spec is not None and spec.target is not None and target != spec.target:
        raise ConfigError(f"--target {target!r} differs from the schema's target {spec.target!r}; "
                          "give one of them, or make them agree")
    if target is None:
        raise DataError(f"the csv dataset needs a target column: pass --target NAME (columns of "
                        f"{path.name}: {', '.join(read_header(path))})")
    table = read_table(path)
    labels, class_names = encode_labels(table, target, spec.classes if spec else None)
    rows = split_indices(len(labels), options.val_fraction, options.test_fraction, options.seed)
    split_of = _split_names(len(labels), rows)
    if spec is None or spec.classes is None:
        _check_unseen_classes(labels, class_names, target, split_of)
    schema = infer_schema(table, target, spec, fit_rows=rows[0].tolist())
    _check_unseen_categories(table, schema, spec, split_of)
    table, clipped = clip_to_bounds(table, schema, spec, split_of)
    x, y = schema.encode(table), torch.tensor(labels, dtype=torch.long)
    train, val, test = (Split(x[index], y[index]) for index in rows)
    return Dataset("csv", train, val, test, num_classes=len(class_names), default_model="mlp",
                   class_names=class_names,
                   metadata={"source": str(path), "target": target,
                             "schema": table_encoding(schema, spec, class_names),
                             "feature_names": schema.column_names(), "clipped": clipped})


# -- reading -----------------------------------------------------------------------------------

def _schema_spec(schema: Path | str | SchemaSpec | None) -> SchemaSpec | None:
    return schema if isinstance(schema, SchemaSpec) or schema is None else read_schema_spec(schema)


def _require_file(path: Path | str | None) -> Path:
    if path is None:
        raise DataError("the csv dataset needs a file: pass --data FILE.csv")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"csv file {str(path)!r} does not exist or is not a file")
    return path


def read_header(path: Path) -> list[str]:
    return [name.strip() for name in next(_rows(path), [])]


def read_table(path: Path) -> Table:
    """Columns by name, values as stripped strings; empty cells and ragged rows raise DataError."""
    header = read_header(path)
    if not header or len(set(header)) != len(header) or "" in header:
        raise DataError(f"{path} needs a header row of distinct, non-empty column names, got {header}")
    table: Table = {name: [] for name in header}
    rows = _rows(path)
    next(rows)
    # data rows count from 0 and skip blank lines, as the type and schema checks count them
    for row_number, row in enumerate(row for row in rows if row):
        if len(row) != len(header):
            raise DataError(f"{path}, data row {row_number}: {len(row)} values but the header has "
                            f"{len(header)} columns")
        for name, value in zip(header, row):
            value = value.strip()
            if value == "":
                raise DataError(f"{path}, data row {row_number}: column {name!r} is empty; fill or "
                                "drop missing values first")
            table[name].append(value)
    if not table[header[0]]:
        raise DataError(f"{path} has a header but no data rows")
    return table


def _rows(path: Path) -> Iterator[list[str]]:
    """The file's rows, read as UTF-8 whatever the locale; a BOM (as Excel writes) is dropped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            # skipinitialspace: in `20, "own"` the quotes after ", " delimit the field, as they do after ","
            reader = csv.reader(handle, skipinitialspace=True)
            try:
                yield from reader
            except csv.Error as err:
                raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (cannot decode byte {err.object[err.start]:#04x}); "
                        "save the CSV as UTF-8") from None


def encode_labels(table: Table, target: str, classes: Sequence[str] | None = None
                  ) -> tuple[list[int], list[str]]:
    """Class indices of the target's cells, and the class names.

    ``classes`` (a schema's) fixes the classes and their order; without it they are the distinct
    values, sorted (numbers in numeric order). Numbers are compared as numbers, so ``1`` and ``1.0``
    are one class (named by its shortest spelling).
    """
    if target not in table:
        raise DataError(f"target column {target!r} is not in the data; columns: {', '.join(table)}")
    values = table[target]
    names = list(classes) if classes is not None else _class_names(values)
    index: dict[tuple[int, float, str], int] = {}
    for i, name in enumerate(names):
        if index.setdefault(_label_key(name), i) != i:
            raise ConfigError(f"classes {names[index[_label_key(name)]]!r} and {name!r} are the same "
                              "label; list each class once")
    if len(names) < 2:
        raise DataError(f"target column {target!r} holds a single class {names}; need at least two")
    labels = []
    for row, value in enumerate(values):
        if _parse(value) is not None and not _is_number(value):
            raise DataError(f"target column {target!r}, row {row}: {value!r} is not a label; fill or "
                            "drop rows whose label is missing")
        label = index.get(_label_key(value))
        if label is None:
            raise DataError(f"target column {target!r}, row {row}: {value!r} is not one of the schema's "
                            f"classes: {', '.join(names)}")
        labels.append(label)
    return labels, names


def _label_key(value: str) -> tuple[int, float, str]:
    """What makes two target cells one class: the number they spell, else their text."""
    return (0, float(value), "") if _is_number(value) else (1, 0.0, value)


def _class_names(values: list[str]) -> list[str]:
    spellings: dict[tuple[int, float, str], list[str]] = {}
    for value in set(values):
        spellings.setdefault(_label_key(value), []).append(value)
    return [min(spellings[key], key=lambda v: (len(v), v)) for key in sorted(spellings)]


# -- fitting on the training rows ---------------------------------------------------------------

SPLITS = ("train", "val", "test")


def _split_names(n: int, rows: tuple[torch.Tensor, ...]) -> list[str]:
    """The split of each data row."""
    names = [""] * n
    for name, index in zip(SPLITS, rows):
        for row in index.tolist():
            names[row] = name
    return names


def _given(spec: SchemaSpec | None, name: str) -> Mapping[str, Any]:
    return spec.features.get(name, {}) if spec is not None else {}


def _check_unseen_categories(table: Table, schema: Schema, spec: SchemaSpec | None,
                             split_of: list[str]) -> None:
    """Refuse a category the training rows lack: the model would have a column it never saw set.
    Categories a schema file lists are its business (``Schema.encode`` refuses any others)."""
    for feature in schema.features:
        if feature.type != "categorical" or "categories" in _given(spec, feature.name):
            continue
        known = set(feature.categories)
        for row, value in enumerate(table[feature.name]):
            if value not in known:
                raise DataError(f"column {feature.name!r}, data row {row}: category {value!r} appears in "
                                f"the {split_of[row]} split but in no training row, so the model has no "
                                "column for it; list it under the column's categories in a schema file "
                                "(--schema), or drop or merge such rows")


def _check_unseen_classes(labels: list[int], class_names: list[str], target: str,
                          split_of: list[str]) -> None:
    """Refuse a class the training rows lack: the model would have an output it never learnt.
    Classes a schema file lists are its business."""
    trained = {label for label, split in zip(labels, split_of) if split == "train"}
    for row, (label, split) in enumerate(zip(labels, split_of)):
        if label not in trained:
            raise DataError(f"target column {target!r}, data row {row}: class {class_names[label]!r} "
                            f"appears in the {split} split but in no training row, so the model would "
                            "never learn it; list the classes in a schema file (classes: [...]), or "
                            "drop or relabel such rows")


def clip_to_bounds(table: Table, schema: Schema, spec: SchemaSpec | None, split_of: list[str]
                   ) -> tuple[Table, dict[str, int]]:
    """``table`` with numeric values clipped into the bounds inferred from the training rows, and
    the count of clipped values per split."""
    clipped = dict.fromkeys(SPLITS, 0)
    table = dict(table)
    for feature in schema.features:
        low, high = _clip_range(feature, spec)
        if (low, high) == (-math.inf, math.inf):
            continue
        column = list(table[feature.name])
        for row, value in enumerate(column):
            # a schema file's column is not inferred, so its cells have not been checked yet
            number = parse_number(feature, row, value)
            if not low <= number <= high:
                column[row] = repr(min(max(number, low), high))
                clipped[split_of[row]] += 1
        table[feature.name] = column
    return table, clipped


def _clip_range(feature: Feature, spec: SchemaSpec | None) -> tuple[float, float]:
    """The sides estimated from the training rows. A side a schema file gives is a statement about
    the data, not an estimate, so a value beyond it must reach the refusal in ``Schema.encode``."""
    fitted = _fitted_sides(feature, spec)
    low, high = feature.low, feature.high
    return (low if "low" in fitted and low is not None else -math.inf,
            high if "high" in fitted and high is not None else math.inf)


def _fitted_sides(feature: Feature, spec: SchemaSpec | None) -> tuple[str, ...]:
    """The bounds of ``feature`` inferred from the training rows, or that the schema says were."""
    if feature.type not in ("continuous", "integer"):
        return ()
    given, fitted = _given(spec, feature.name), spec.fitted_bounds.get(feature.name, ()) if spec else ()
    return tuple(side for side in ("low", "high") if side not in given or side in fitted)


def table_encoding(schema: Schema, spec: SchemaSpec | None, class_names: list[str]) -> dict[str, Any]:
    """How the table became the model's inputs and labels, as a schema file that reproduces it: the
    features with their bounds, the classes, and which bounds were estimates (clipped to)."""
    fitted = {f.name: list(sides) for f in schema.features if (sides := _fitted_sides(f, spec))}
    return {**schema.to_dict(), "classes": class_names, "fitted_bounds": fitted}


# -- schema inference ---------------------------------------------------------------------------

def infer_schema(table: Mapping[str, list[str]], target: str, spec: SchemaSpec | None = None,
                 fit_rows: list[int] | None = None) -> Schema:
    """The table's schema: ``spec``'s settings where given, inferred from the values elsewhere
    (bounds and categories from the rows ``fit_rows`` only; every row when None)."""
    columns = [name for name in table if name != target]
    if spec is not None:
        _check_columns(spec, columns, target)
        if not spec.infer_missing:  # a complete schema orders the model's columns; the file may not
            columns = list(spec.features)
    features = tuple(infer_feature(name, table[name], _given(spec, name), fit_rows) for name in columns)
    return Schema(features, target)


def _check_columns(spec: SchemaSpec, columns: list[str], target: str) -> None:
    unknown = [name for name in spec.features if name not in columns]
    if unknown:
        where = " (it is the target)" if target in unknown else ""
        raise DataError(f"schema feature(s) {unknown} are not columns of the data{where}; "
                        f"columns: {', '.join(columns)}")
    missing = [name for name in columns if name not in spec.features]
    if missing and not spec.infer_missing:
        raise DataError(f"data column(s) {missing} are not in the schema; add them, or set "
                        "'infer_missing: true' to infer them from the data")


def infer_feature(name: str, values: list[str], given: Mapping[str, Any],
                  fit_rows: list[int] | None = None) -> Feature:
    """One feature: ``given`` settings win, the rest come from the column's values. The type, and
    the check that every cell fits it, see every value; bounds and categories only those at
    ``fit_rows`` (every row when None)."""
    settings = dict(given)
    if "type" not in settings:  # not setdefault: inference may refuse a column the schema declares
        settings["type"] = _infer_type(name, values)
    kind = settings["type"]
    if kind == "categorical" and "categories" not in settings:
        settings["categories"] = _fitted_categories(name, values, fit_rows)
    elif kind in ("continuous", "integer") and not ("low" in settings and "high" in settings):
        numbers = _rows_of(_numbers(name, values, kind), fit_rows)
        low, high = min(numbers), max(numbers)
        settings.setdefault("low", low)
        settings.setdefault("high", high if high > low else low + 1)
    return Feature(name=name, **settings)


def _fitted_categories(name: str, values: list[str], fit_rows: list[int] | None) -> list[str]:
    """The categories of the training rows; fewer than two is a DataError that says why (a value
    seen only outside them, or one value throughout), where Feature's own check named neither."""
    seen = sorted(set(_rows_of(values, fit_rows)))
    if len(seen) >= 2:
        return seen
    elsewhere = sorted(set(values) - set(seen))
    if elsewhere:
        raise DataError(f"column {name!r}: the training rows hold only {seen}, and {elsewhere[:5]} appear "
                        "only in validation or test rows; list every category under the column's "
                        "'categories' in a schema file (--schema), or drop or merge those rows")
    raise DataError(f"column {name!r} holds one value ({seen[0]!r}) in every row, and a categorical "
                    "feature needs two categories; drop the column, or list its categories in a schema "
                    "file (--schema)")


def _rows_of(values: list[Any], rows: list[int] | None) -> list[Any]:
    return values if rows is None else [values[row] for row in rows]


def _infer_type(name: str, values: list[str]) -> str:
    parsed = [_parse(v) for v in values]
    numbers = [n for n in parsed if n is not None]
    _check_missing_markers(name, values, parsed)
    if len(numbers) < NUMERIC_SHARE * len(values):
        return "categorical"
    _check_numeric_column(name, values, parsed, len(numbers))
    distinct = set(numbers)
    if all(n == round(n) for n in distinct):
        if distinct <= {0.0, 1.0}:
            return "binary"
        # a wider range of whole numbers than float32 resolves is read as continuous
        return "integer" if max(distinct) - min(distinct) <= MAX_INTEGER_SPAN else "continuous"
    return "continuous"


# cells that stand for a missing number (R's write.csv writes NA); compared without case
# (nan parses as a number, which _check_numeric_column refuses as not finite)
MISSING_MARKERS = frozenset({"na", "n/a", "null", "none", "?"})


def _check_missing_markers(name: str, values: list[str], parsed: list[float | None]) -> None:
    """A column of numbers whose other cells all mark a missing value is numeric with gaps: read as
    categorical it would lose its order (0 to 4 children one category switch apart)."""
    others = [(row, v) for row, (v, n) in enumerate(zip(values, parsed)) if n is None]
    if others and len(others) < len(values) and all(v.lower() in MISSING_MARKERS for _, v in others):
        row, value = others[0]
        raise DataError(f"column {name!r} holds numbers and {len(others)} cell(s) marking a missing value "
                        f"(data row {row}: {value!r}); fill or drop missing values first, or declare the "
                        "column categorical in a schema file (--schema)")


def _check_numeric_column(name: str, values: list[str], parsed: list[float | None], n_numbers: int) -> None:
    """A mostly numeric column must be all finite numbers: one odd cell must not make it categorical."""
    for row, (value, number) in enumerate(zip(values, parsed)):
        if number is None:
            share = 100 * n_numbers // len(values)
            raise DataError(f"column {name!r}, data row {row}: {value!r} is not a number, but {share}% of "
                            "the column is numbers; fix such cells, or declare the column categorical "
                            "in a schema file (--schema)")
        if not math.isfinite(number):
            raise DataError(f"column {name!r}, data row {row}: {value!r} is not a finite number; fill or "
                            "drop missing values first")


def _parse(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _numbers(name: str, values: list[str], kind: str) -> list[float]:
    numbers = []
    for row, value in enumerate(values):
        if not _is_number(value):
            raise DataError(f"feature {name!r}, row {row}: {value!r} is not a number "
                            f"(the schema says {kind})")
        numbers.append(float(value))
    return numbers


def _is_number(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return number == number and abs(number) != float("inf")
