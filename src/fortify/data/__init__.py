"""Datasets: a registry of in-memory datasets with deterministic splits."""

import warnings

from fortify.data import mnist5k as _mnist5k  # noqa: F401  (registers mnist5k)
from fortify.data import npz as _npz  # noqa: F401  (registers npz)
from fortify.data import sklearn_sets as _sklearn_sets  # noqa: F401  (registers digits, breast-cancer)
from fortify.data import torchvision_sets as _torchvision_sets  # noqa: F401
from fortify.data.base import Dataset, Split
from fortify.data.registry import DATASETS, DataOptions

__all__ = ["DATASETS", "DataOptions", "Dataset", "Split", "load_dataset"]


def load_dataset(name: str, options: DataOptions | None = None) -> Dataset:
    """Build a registered dataset and check it against its declared box and label range."""
    dataset = DATASETS.get(name)(options or DataOptions())
    assert isinstance(dataset, Dataset)
    return note_inputs_also_in_training(dataset.validate())


def note_inputs_also_in_training(dataset: Dataset) -> Dataset:
    """Warn of validation and test inputs that repeat a training input, and record their counts in
    the dataset's summary (``inputs_also_in_train``) so that results.json and the report carry them."""
    seen = dataset.inputs_also_in_training()
    if not any(seen.values()):
        return dataset
    dataset.metadata["inputs_also_in_train"] = {"validation": seen["val"], "test": seen["test"]}
    counts = [f"{seen[key]} of {len(getattr(dataset, key))} {name} inputs"
              for key, name in (("test", "test"), ("val", "validation")) if seen[key]]
    warnings.warn(f"dataset {dataset.name!r}: {' and '.join(counts)} also appear in the training split "
                  "(exact copies, under any label); accuracy on them measures memory rather than "
                  "generalisation: remove duplicate rows from the data", stacklevel=3)
    return dataset
