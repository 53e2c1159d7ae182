"""Any CSV with a target column as a dataset (registered as ``csv``), its schema inferred or given.

Without a schema file every column but the target is inferred: numbers that are all whole are
``integer`` (``binary`` when they are all 0 or 1), other numbers ``continuous``, anything else
``categorical``. A column that is mostly numbers (``NUMERIC_SHARE``) but holds NaN, Inf or a few
text cells is refused rather than turned into categories. Bounds are the column's minimum and
maximum (a constant column gets ``[v, v + 1]``), categories its distinct values, and every feature
is mutable in any direction at cost 1. A schema file overrides this per feature; each key it leaves
out is inferred. With ``infer_missing: false`` (the default) the schema must name every column, so
a schema written for another table fails. The file must be UTF-8 text (a leading byte-order mark
is allowed).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fortify.data.base import Dataset, split_arrays
from fortify.data.registry import DATASETS, DataOptions
from fortify.errors import DataError
from fortify.tabular.schema import Feature, Schema, SchemaSpec, read_schema_spec

Table = dict[str, list[str]]

# Without a schema, a column is numeric when at least this share of its cells are numbers: its few
# other cells are then typos or missing-value markers, not categories worth a one-hot column each.
NUMERIC_SHARE = 0.9


@dataclass(frozen=True)
class TableOptions(DataOptions):
    """DataOptions plus what a table needs: the target column and an optional schema file."""

    target: str | None = None
    schema: Path | str | None = None


@DATASETS.register("csv")
def load_csv(options: DataOptions) -> Dataset:
    path = _require_file(options.path)
    spec = read_schema_spec(options.schema) if getattr(options, "schema", None) else None
    target = getattr(options, "target", None) or (spec.target if spec else None)
    if target is None:
        raise DataError(f"the csv dataset needs a target column: pass --target NAME (columns of "
                        f"{path.name}: {', '.join(read_header(path))})")
    table = read_table(path)
    labels, class_names = encode_labels(table, target)
    schema = infer_schema(table, target, spec)
    x = schema.encode(table)
    y = torch.tensor(labels, dtype=torch.long)
    train, val, test = split_arrays(x, y, options.val_fraction, options.test_fraction, options.seed)
    return Dataset("csv", train, val, test, num_classes=len(class_names), default_model="mlp",
                   class_names=class_names,
                   metadata={"source": str(path), "target": target, "schema": schema.to_dict(),
                             "feature_names": schema.column_names()})


# -- reading -----------------------------------------------------------------------------------

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
            reader = csv.reader(handle)
            try:
                yield from reader
            except csv.Error as err:
                raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (cannot decode byte {err.object[err.start]:#04x}); "
                        "save the CSV as UTF-8") from None


def encode_labels(table: Table, target: str) -> tuple[list[int], list[str]]:
    """Class indices in sorted order of the target's distinct values (numeric order for numbers)."""
    if target not in table:
        raise DataError(f"target column {target!r} is not in the data; columns: {', '.join(table)}")
    values = table[target]
    distinct = sorted(set(values), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))
    if len(distinct) < 2:
        raise DataError(f"target column {target!r} holds a single class {distinct}; need at least two")
    index = {v: i for i, v in enumerate(distinct)}
    return [index[v] for v in values], distinct


# -- schema inference ---------------------------------------------------------------------------

def infer_schema(table: Mapping[str, list[str]], target: str, spec: SchemaSpec | None = None) -> Schema:
    """The table's schema: ``spec``'s settings where given, inferred from the values elsewhere."""
    columns = [name for name in table if name != target]
    if spec is not None:
        _check_columns(spec, columns, target)
    entries = spec.features if spec is not None else {}
    features = tuple(infer_feature(name, table[name], entries.get(name, {})) for name in columns)
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


def infer_feature(name: str, values: list[str], given: Mapping[str, Any]) -> Feature:
    """One feature: ``given`` settings win, the rest come from the column's values."""
    settings = dict(given)
    if "type" not in settings:  # not setdefault: inference may refuse a column the schema declares
        settings["type"] = _infer_type(name, values)
    kind = settings["type"]
    if kind == "categorical":
        settings.setdefault("categories", sorted(set(values)))
        settings["categories"] = tuple(str(c) for c in settings["categories"])
    elif kind in ("continuous", "integer") and not ("low" in settings and "high" in settings):
        numbers = _numbers(name, values, kind)
        low, high = min(numbers), max(numbers)
        settings.setdefault("low", low)
        settings.setdefault("high", high if high > low else low + 1)
    return Feature(name=name, **settings)


def _infer_type(name: str, values: list[str]) -> str:
    parsed = [_parse(v) for v in values]
    numbers = [n for n in parsed if n is not None]
    if len(numbers) < NUMERIC_SHARE * len(values):
        return "categorical"
    _check_numeric_column(name, values, parsed, len(numbers))
    distinct = set(numbers)
    if all(n == round(n) for n in distinct):
        return "binary" if distinct <= {0.0, 1.0} else "integer"
    return "continuous"


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
