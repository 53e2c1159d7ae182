"""How a run uses tabular data: data options for a table, the schema to apply, the threat model.

A run is tabular when the dataset is ``csv`` (its schema given or inferred) or when ``data.schema``
names a schema for another dataset: a YAML path, or a bundled name (``BUNDLED``). Its threat model
is then a ConstrainedThreatModel over that schema; otherwise the plain ThreatModel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from fortify.data import DataOptions, Dataset, Split
from fortify.errors import ConfigError, DataError
from fortify.tabular.constraints import ConstrainedThreatModel
from fortify.tabular.csv import TableOptions
from fortify.tabular.schema import Feature, Schema, SchemaSpec, load_schema
from fortify.tabular.study import study_constraints
from fortify.threat import ThreatModel

# Size measurements of a breast-cancer tumour: a reviewer checks them against the image, so the
# schema lets an attacker tamper only with the texture and shape measurements
_CANCER_SIZE = ("radius", "perimeter", "area")


def breast_cancer_schema(dataset: Dataset) -> Schema:
    """Schema of the bundled breast-cancer data: 30 continuous measurements, bounds = the training
    split's range (the scaling the dataset applied, so the schema holds no statistic of the test
    rows), size measurements immutable, all others mutable."""
    names = dataset.metadata.get("feature_names")
    low, high = dataset.metadata.get("raw_min"), dataset.metadata.get("raw_max")
    if not (isinstance(names, list) and isinstance(low, list) and isinstance(high, list)):
        raise DataError(f"dataset {dataset.name!r} carries no feature names and ranges; the "
                        "'breast-cancer' schema fits the breast-cancer dataset only")
    return Schema(tuple(Feature(name, "continuous", lo, hi,
                                mutable=not any(size in name for size in _CANCER_SIZE))
                        for name, lo, hi in zip(names, low, high)))


BUNDLED: dict[str, Callable[[Dataset], Schema]] = {"breast-cancer": breast_cancer_schema}


def table_options(options: DataOptions, target: str | None, schema: str | None,
                  encoding: dict[str, Any] | None = None) -> DataOptions:
    """``options`` plus the target column and schema a csv dataset reads: ``encoding`` (a model
    card's, which is a complete schema) when given, else the schema file."""
    if target is None and schema is None:
        return options
    schema_file = None if schema is None or schema in BUNDLED else _schema_file(schema)
    return TableOptions(**{f.name: getattr(options, f.name) for f in fields(options)}, target=target,
                        schema=SchemaSpec.from_dict(encoding) if encoding is not None else schema_file)


def _schema_file(schema: str) -> Path:
    if not Path(schema).is_file():
        raise ConfigError(f"schema {schema!r} is neither a file nor a bundled schema; bundled: "
                          f"{', '.join(sorted(BUNDLED))}")
    return Path(schema)


def dataset_schema(dataset: Dataset, schema: str | None) -> Schema | None:
    """The schema a run applies to ``dataset``, or None when the run is not tabular."""
    if dataset.name == "csv":
        if schema in BUNDLED:  # the csv reader took no file, so the name would be dropped silently
            raise ConfigError(f"schema {schema!r} is bundled for its own dataset; a csv dataset reads "
                              "its schema from a YAML file (--schema FILE) or infers it from the table")
        return Schema.from_dict(dataset.metadata["schema"])  # type: ignore[arg-type]
    if schema is None:
        return None
    if schema in BUNDLED:
        return BUNDLED[schema](dataset)
    return load_schema(_schema_file(schema))


def run_threat(norm: str, eps: float, dataset: Dataset, schema: str | None) -> ThreatModel:
    """The run's threat model: constrained over the dataset's schema, or the plain box one."""
    resolved = dataset_schema(dataset, schema)
    if resolved is None:
        return ThreatModel(norm, eps, dataset.bounds)  # type: ignore[arg-type]
    if tuple(dataset.bounds) != (0.0, 1.0):
        raise DataError(f"a schema applies to data encoded in [0, 1]; dataset {dataset.name!r} "
                        f"declares bounds {dataset.bounds}")
    threat = ConstrainedThreatModel(norm, eps, schema=resolved)  # type: ignore[arg-type]
    for split in ("train", "val", "test"):
        try:
            resolved.check_encoded(getattr(dataset, split).x)
        except DataError as err:
            raise DataError(f"dataset {dataset.name!r}, {split} split does not fit the schema: "
                            f"{err}") from None
    return threat


def tabular_section(model: nn.Module, threat: ThreatModel, test: Split, steps: int | None,
                    batch_size: int, seed: int) -> dict[str, Any]:
    """``{"tabular": ConstraintStudy}`` for a constrained run (robust accuracy per constraint
    setting, per-feature change counts); ``{}`` for any other run."""
    if not isinstance(threat, ConstrainedThreatModel):
        return {}
    study = study_constraints(model, test.x, test.y, threat, steps=steps or 20, batch_size=batch_size,
                              seed=seed)
    return {"tabular": study.to_dict()}
