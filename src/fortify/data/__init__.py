"""Datasets: a registry of in-memory datasets with deterministic splits."""

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
    return dataset.validate()
