"""Tabular data under real-world constraints: schemas, a constrained threat model, a CSV dataset,
a feature-search attack and per-feature change counts.

Importing this package registers the ``csv`` dataset and the ``feature-search`` attack.
"""

from fortify.tabular.changes import FeatureChanges, changed_features, count_feature_changes
from fortify.tabular.constraints import ConstrainedThreatModel
from fortify.tabular.csv import TableOptions, infer_schema, load_csv, read_table
from fortify.tabular.schema import Feature, Schema, SchemaSpec, load_schema, read_schema_spec
from fortify.tabular.search import FeatureSearch
from fortify.tabular.study import ConstraintStudy, study_constraints

__all__ = ["ConstrainedThreatModel", "ConstraintStudy", "Feature", "FeatureChanges", "FeatureSearch",
           "Schema", "SchemaSpec", "TableOptions", "changed_features", "count_feature_changes",
           "infer_schema", "load_csv", "load_schema", "read_schema_spec", "read_table",
           "study_constraints"]
