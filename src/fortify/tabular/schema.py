"""Feature schema of a table: what each column is, its range, and what an attacker may do to it.

A schema lists features in order. Each feature is one of

- ``continuous``: a real number in ``[low, high]``;
- ``integer``: a whole number in ``[low, high]`` (``low`` and ``high`` whole);
- ``binary``: 0 or 1;
- ``categorical``: one of ``categories``, encoded one-hot (one model column per category).

and says whether an attacker may change it (``mutable``), in which ``direction`` (``any``,
``increase`` or ``decrease``; numeric features only) and at what ``cost`` per unit of scaled change
(the weight of the threat model's norm; a category switch costs ``cost``).

A bound is a statement about the data: a value beyond it is refused. A bound that ``fitted_bounds``
names was estimated from the training rows (fortify records so in the encoding a model card keeps),
and a value beyond it is clipped to it, as training clipped its validation and test rows.

The model sees every numeric feature min-max scaled by its bounds into [0, 1], so the whole table
lives in the usual [0, 1] box and a budget ``eps`` reads as "a share of the feature's range".

YAML form (``features`` keeps the column order)::

    target: default            # optional
    classes: ['no', 'yes']     # optional: the target's classes in class-index order
    fitted_bounds: {income: [high]}  # optional: bounds estimated from training rows, clipped to
    infer_missing: false       # true: columns the schema omits are inferred from the CSV
    features:
      age:      {type: integer, low: 18, high: 100, mutable: false}
      income:   {type: continuous, low: 0, high: 250000, cost: 2.0}
      accounts: {type: integer, low: 0, high: 20, direction: increase}
      housing:  {type: categorical, categories: [own, rent, other]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from fortify.config import load_yaml
from fortify.errors import ConfigError, DataError

FEATURE_TYPES: tuple[str, ...] = ("continuous", "integer", "binary", "categorical")
DIRECTIONS: tuple[str, ...] = ("any", "increase", "decrease")
FEATURE_KEYS: tuple[str, ...] = ("type", "low", "high", "categories", "mutable", "direction", "cost")
SCHEMA_KEYS: tuple[str, ...] = ("target", "classes", "fitted_bounds", "infer_missing", "features")


@dataclass(frozen=True)
class Feature:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] = ()
    mutable: bool = True
    direction: str = "any"
    cost: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in FEATURE_TYPES:
            raise ConfigError(f"feature {self.name!r}: unknown type {self.type!r}; "
                              f"valid types: {', '.join(FEATURE_TYPES)}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"feature {self.name!r}: unknown direction {self.direction!r}; "
                              f"valid directions: {', '.join(DIRECTIONS)}")
        if not isinstance(self.mutable, bool):
            raise ConfigError(f"feature {self.name!r}: mutable must be true or false, got {self.mutable!r}")
        cost = _number(self.name, "cost", self.cost)
        if not cost > 0:
            raise ConfigError(f"feature {self.name!r}: cost must be a finite number > 0, got {self.cost!r}")
        object.__setattr__(self, "cost", cost)
        if self.type == "categorical":
            self._check_categorical()
        else:
            self._check_numeric()

    def _check_categorical(self) -> None:
        cats = category_names(f"feature {self.name!r}: category", self.categories)
        if len(cats) < 2 or len(set(cats)) != len(cats):
            raise ConfigError(f"feature {self.name!r}: a categorical feature needs at least two distinct "
                              f"categories, got {list(self.categories)!r}")
        if self.direction != "any":
            raise ConfigError(f"feature {self.name!r}: direction {self.direction!r} applies to numeric "
                              "features only; categories have no order (use direction: any)")
        if self.low is not None or self.high is not None:
            raise ConfigError(f"feature {self.name!r}: a categorical feature takes categories, not low/high")
        object.__setattr__(self, "categories", cats)

    def _check_numeric(self) -> None:
        if self.categories:
            raise ConfigError(f"feature {self.name!r}: categories apply to categorical features only, "
                              f"not to type {self.type!r}")
        if self.type == "binary":
            low, high = (0.0 if self.low is None else self.low), (1.0 if self.high is None else self.high)
            if (low, high) != (0.0, 1.0):
                raise ConfigError(f"feature {self.name!r}: a binary feature has bounds [0, 1], "
                                  f"got [{low}, {high}]")
        else:
            if self.low is None or self.high is None:
                raise ConfigError(f"feature {self.name!r}: a {self.type} feature needs low and high")
            low, high = _number(self.name, "low", self.low), _number(self.name, "high", self.high)
            if not low < high:
                raise ConfigError(f"feature {self.name!r}: bounds need low < high, got [{low}, {high}]")
            if not math.isfinite(high - low):
                raise ConfigError(f"feature {self.name!r}: the range [{low:g}, {high:g}] is wider than a "
                                  "float can hold; give the bounds the data can reach")
            if self.type == "integer" and (low != round(low) or high != round(high)):
                raise ConfigError(f"feature {self.name!r}: an integer feature needs whole bounds, "
                                  f"got [{low}, {high}]")
            if self.type == "integer" and high - low > MAX_INTEGER_SPAN:
                raise ConfigError(f"feature {self.name!r}: an integer feature spans at most "
                                  f"{MAX_INTEGER_SPAN:,} whole numbers, got [{low:g}, {high:g}]: float32 "
                                  "inputs cannot tell its neighbours apart reliably; declare it continuous")
        object.__setattr__(self, "low", float(low))
        object.__setattr__(self, "high", float(high))

    @property
    def width(self) -> int:
        """Model columns this feature takes: one per category, else one."""
        return len(self.categories) if self.type == "categorical" else 1

    @property
    def discrete(self) -> bool:
        return self.type != "continuous"

    @property
    def span(self) -> float:
        """``high - low`` for numeric features (the scale of the [0, 1] encoding)."""
        assert self.low is not None and self.high is not None
        return self.high - self.low

    def column_names(self) -> list[str]:
        if self.type == "categorical":
            return [f"{self.name}={c}" for c in self.categories]
        return [self.name]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        if self.type == "categorical":
            data["categories"] = list(self.categories)
            del data["low"], data["high"]
        else:
            del data["categories"]
        return data


@dataclass(frozen=True)
class Schema:
    """Ordered features plus the name of the target column (if the schema came with a table)."""

    features: tuple[Feature, ...]
    target: str | None = None
    _starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.features:
            raise ConfigError("a schema needs at least one feature")
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"schema lists feature(s) {duplicated} more than once")
        if self.target is not None and self.target in names:
            raise ConfigError(f"the target column {self.target!r} cannot also be a feature")
        starts, start = [], 0
        for feature in self.features:
            starts.append(start)
            start += feature.width
        object.__setattr__(self, "_starts", tuple(starts))

    # -- layout ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_columns(self) -> int:
        return self._starts[-1] + self.features[-1].width

    def columns(self, index: int) -> slice:
        """The model columns of feature number ``index``."""
        start = self._starts[index]
        return slice(start, start + self.features[index].width)

    def column_names(self) -> list[str]:
        return [name for f in self.features for name in f.column_names()]

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise ConfigError(f"schema has no feature {name!r}; features: {', '.join(self.names)}")

    def replace_features(self, **changes: Any) -> Schema:
        """The same schema with ``changes`` applied to every feature (e.g. ``mutable=True``)."""
        from dataclasses import replace

        return Schema(tuple(replace(f, **_applicable(f, changes)) for f in self.features), self.target)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, table: Mapping[str, Sequence[Any]]) -> Tensor:
        """Raw columns (name -> values) to the model's [0, 1] matrix; bad values raise DataError."""
        missing = [n for n in self.names if n not in table]
        if missing:
            raise DataError(f"the data lack schema feature(s) {missing}; "
                            f"data columns: {', '.join(map(str, table))}")
        lengths = {f.name: len(table[f.name]) for f in self.features}
        if len(set(lengths.values())) > 1:
            raise DataError(f"the data's columns differ in length: {lengths}; every column needs one "
                            "value per row")
        blocks = [_encode_feature(f, table[f.name]) for f in self.features]
        return torch.cat(blocks, dim=1)

    def check_encoded(self, x: Tensor) -> None:
        """Raise DataError unless ``x`` is a valid encoding: bounds, whole numbers, one-hot groups."""
        if x.dim() != 2 or x.shape[1] != self.n_columns:
            raise DataError(f"the schema has {self.n_columns} model columns ({len(self.features)} features) "
                            f"but the inputs have shape {tuple(x.shape)}")
        for index, feature in enumerate(self.features):
            block = x[:, self.columns(index)].double()
            problem = _encoding_problem(feature, block)
            if problem is not None:
                row, value, what = problem
                raise DataError(f"feature {feature.name!r}, row {row}: {what} (value {value})")

    # -- YAML / dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "features": {f.name: f.to_dict() for f in self.features}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schema:
        spec = SchemaSpec.from_dict(data)
        return cls(tuple(_build_feature(name, entry) for name, entry in spec.features.items()), spec.target)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class SchemaSpec:
    """A schema as written: possibly partial entries that inference from a table completes."""

    features: dict[str, dict[str, Any]]
    target: str | None = None
    infer_missing: bool = False
    classes: tuple[str, ...] | None = None  # the target's classes in index order; None: from the data
    fitted_bounds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> "low"/"high"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchemaSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a schema must be a mapping with a 'features' key, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SCHEMA_KEYS))
        if unknown:
            raise ConfigError(f"unknown schema key(s) {unknown}; valid keys: {', '.join(SCHEMA_KEYS)}")
        features = data.get("features")
        if not isinstance(features, Mapping) or not features:
            raise ConfigError("a schema needs 'features': a mapping from column name to its settings")
        entries = {}
        for name, entry in features.items():
            entry = {} if entry is None else entry
            if not isinstance(entry, Mapping):
                raise ConfigError(f"feature {name!r}: settings must be a mapping, got {entry!r}")
            bad = sorted(set(entry) - set(FEATURE_KEYS))
            if bad:
                raise ConfigError(f"feature {name!r}: unknown key(s) {bad}; "
                                  f"valid keys: {', '.join(FEATURE_KEYS)}")
            entries[str(name)] = _with_listed_categories(str(name), dict(entry))
        target = data.get("target")
        infer = data.get("infer_missing", False)
        if not isinstance(infer, bool):
            raise ConfigError(f"infer_missing must be true or false, got {infer!r}")
        classes = data.get("classes")
        if classes is not None:
            if not isinstance(classes, list):
                raise ConfigError(f"classes must be a list of the target's values, got {classes!r}")
            classes = category_names("class", classes)
            if len(classes) < 2:
                raise ConfigError(f"classes must list at least two classes, got {list(classes)!r}")
        return cls(entries, None if target is None else str(target), infer, classes,
                   _fitted_bounds(data.get("fitted_bounds", {}), entries))


def _fitted_bounds(data: Any, features: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"fitted_bounds must map feature names to [low, high] or a part, got {data!r}")
    fitted = {}
    for name, sides in data.items():
        if name not in features:
            raise ConfigError(f"fitted_bounds names {name!r}, which is not a schema feature")
        if not isinstance(sides, list) or not sides or not set(sides) <= {"low", "high"}:
            raise ConfigError(f"fitted_bounds of {name!r} must list low, high or both, got {sides!r}")
        fitted[str(name)] = tuple(sorted(set(sides), reverse=True))  # low before high
    return fitted


def read_schema_spec(path: Path | str) -> SchemaSpec:
    """Read a schema YAML file (possibly partial; see ``SchemaSpec``)."""
    return SchemaSpec.from_dict(load_yaml(path, "schema"))


def load_schema(path: Path | str) -> Schema:
    """Read a complete schema YAML file (every feature with its type and bounds)."""
    spec = read_schema_spec(path)
    return Schema(tuple(_build_feature(n, e) for n, e in spec.features.items()), spec.target)


# -- helpers -----------------------------------------------------------------------------------

def category_names(what: str, values: Sequence[Any]) -> tuple[str, ...]:
    """Categories or classes written in YAML, as the text the CSV cells hold. YAML 1.1 reads an
    unquoted yes/no/on/off/true/false as a boolean, whose spelling in the data is lost: refused."""
    flag = next((v for v in values if isinstance(v, bool)), None)
    if flag is not None:
        raise ConfigError(f"{what} {flag!r} is a YAML boolean (YAML reads unquoted yes, no, on, off, true "
                          "and false so); quote it as the data spell it, e.g. 'yes'")
    return tuple(str(v) for v in values)


def _with_listed_categories(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with its categories as a tuple; ``categories: null`` counts as not given. A text
    or a number is refused: ``tuple("own")`` would silently make three categories of it."""
    if "categories" not in entry:
        return entry
    given = entry.pop("categories")
    if given is None:
        return entry
    if not isinstance(given, (list, tuple)):
        raise ConfigError(f"feature {name!r}: categories must be a list of the values the column holds, "
                          f"got {given!r}")
    return {**entry, "categories": tuple(given)}


def _number(feature: str, key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"feature {feature!r}: {key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"feature {feature!r}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"feature {feature!r}: {key} must be finite, got {value!r}")
    return number


def _build_feature(name: str, entry: Mapping[str, Any]) -> Feature:
    if "type" not in entry:
        raise ConfigError(f"feature {name!r} has no type; valid types: {', '.join(FEATURE_TYPES)}")
    return Feature(name=name, **_with_listed_categories(name, dict(entry)))


def _applicable(feature: Feature, changes: Mapping[str, Any]) -> dict[str, Any]:
    if feature.type == "categorical":
        return {k: v for k, v in changes.items() if k != "direction" or v == "any"}
    return dict(changes)


def _encode_feature(feature: Feature, values: Sequence[Any]) -> Tensor:
    if feature.type == "categorical":
        return _encode_categorical(feature, values)
    numbers = torch.tensor([parse_number(feature, row, v) for row, v in enumerate(values)],
                           dtype=torch.float64)
    _check_range(feature, numbers)
    assert feature.low is not None
    return ((numbers - feature.low) / feature.span).float().unsqueeze(1)


def _encode_categorical(feature: Feature, values: Sequence[Any]) -> Tensor:
    lookup = {c: i for i, c in enumerate(feature.categories)}
    index = []
    for row, value in enumerate(values):
        key = str(value).strip()
        if key not in lookup:
            raise DataError(f"feature {feature.name!r}, row {row}: category {key!r} is not in the "
                            f"schema; allowed: {', '.join(feature.categories)}")
        index.append(lookup[key])
    return torch.nn.functional.one_hot(torch.tensor(index, dtype=torch.long), feature.width).float()


def parse_number(feature: Feature, row: int, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"feature {feature.name!r}, row {row}: {value!r} is not a number "
                        f"(the schema says {feature.type})") from None
    if not math.isfinite(number):
        raise DataError(f"feature {feature.name!r}, row {row}: value {value!r} is not finite")
    return number


def _check_range(feature: Feature, numbers: Tensor) -> None:
    outside = (numbers < feature.low) | (numbers > feature.high)
    if outside.any():
        row = int(outside.nonzero()[0])
        raise DataError(f"feature {feature.name!r}, row {row}: value {float(numbers[row]):g} is outside "
                        f"the schema bounds [{feature.low:g}, {feature.high:g}]")
    if feature.discrete:
        fractional = numbers != numbers.round()
        if fractional.any():
            row = int(fractional.nonzero()[0])
            raise DataError(f"feature {feature.name!r}, row {row}: value {float(numbers[row]):g} is not a "
                            f"whole number (the schema says {feature.type})")


# Encoded inputs come back as float32: allow that much rounding when checking them
ENCODING_TOLERANCE = 1e-5
# Least slack, in grid steps, on a whole number of a narrow range
WHOLE_TOLERANCE = 1e-4
# float32 stores the scaled whole number k / span with an error of up to span * e / 4 grid steps,
# e being float32's machine epsilon (half a unit in the last place of a value below 1), so a wide
# range (an income in whole dollars) needs slack that grows with the span; 8 e leaves room for
# the float64 arithmetic of the attacks and stays below half a step up to a span of about 500,000
_WHOLE_SLACK_PER_STEP = 8 * torch.finfo(torch.float32).eps


# ... but never a quarter step or more, which would let a half step through; at the widest integer
# span float32's rounding of k / span is at most 2^21 * 2^-24 = 1/8 of a step
_MOST_WHOLE_SLACK = 0.25
# the widest range of an integer feature: 2^21 whole numbers
MAX_INTEGER_SPAN = 2 ** 21


def whole_tolerance(span: float) -> float:
    """How far, in grid steps, a scaled whole number of a ``span``-wide range may be off the grid.

    ``check_encoded`` and the threat model's ``contains`` use this same bound, so a point one
    accepts the other accepts too.
    """
    return min(max(WHOLE_TOLERANCE, _WHOLE_SLACK_PER_STEP * span), _MOST_WHOLE_SLACK)


def _encoding_problem(feature: Feature, block: Tensor) -> tuple[int, str, str] | None:
    """First row that breaks the feature's encoding: (row, value, what is wrong), or None."""
    tol = ENCODING_TOLERANCE
    if feature.type == "categorical":
        binary = ((block.abs() <= tol) | ((block - 1).abs() <= tol)).all(dim=1)
        one = (block.sum(dim=1) - 1).abs() <= tol
        bad = ~(binary & one)
        if bad.any():
            row = int(bad.nonzero()[0])
            return row, str(block[row].tolist()), "not one-hot over its categories"
        return None
    column = block[:, 0]
    bad = ~torch.isfinite(column)
    if bad.any():
        row = int(bad.nonzero()[0])
        return row, f"{float(column[row]):g}", "not a finite number"
    bad = (column < -tol) | (column > 1 + tol)
    if bad.any():
        row = int(bad.nonzero()[0])
        return row, f"{float(column[row]):g}", "outside the scaled range [0, 1]"
    if feature.discrete:
        steps = column * feature.span
        bad = (steps - steps.round()).abs() > whole_tolerance(feature.span)
        if bad.any():
            row = int(bad.nonzero()[0])
            raw = feature.low + float(steps[row])  # type: ignore[operator]
            return row, f"{raw:g}", f"not a whole number (type {feature.type})"
    return None
