"""Datasets bundled with scikit-learn: they need no network, so they are the embedded defaults."""

from __future__ import annotations

import torch

from fortify.data.base import Dataset, Split, split_arrays, split_indices
from fortify.data.registry import DATASETS, DataOptions


@DATASETS.register("digits")
def load_digits(options: DataOptions) -> Dataset:
    """1,797 grey 8x8 digits, pixel values 0..16 scaled into [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = split_arrays(x, y, options.val_fraction, options.test_fraction, options.seed)
    return Dataset("digits", train, val, test, num_classes=10, default_model="small-cnn",
                   class_names=[str(i) for i in range(10)])


@DATASETS.register("breast-cancer")
def load_breast_cancer(options: DataOptions) -> Dataset:
    """569 tumours, 30 features min-max scaled into [0, 1] by the training rows' range.

    The scaling (``raw_min``, ``raw_max``) is fitted on the training split alone, so nothing about
    the validation or test rows leaks into the inputs the model is trained on. Their values outside
    that range are clipped into [0, 1], the box the threat model declares; ``clipped`` in the
    metadata counts the clipped values per split.
    """
    from sklearn.datasets import load_breast_cancer as sk_cancer

    bunch = sk_cancer()
    raw = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    rows = split_indices(len(raw), options.val_fraction, options.test_fraction, options.seed)
    low, high = raw[rows[0]].min(dim=0).values, raw[rows[0]].max(dim=0).values
    # a feature constant on a small training split (zero in every row) has no range to divide by:
    # its range becomes [value, value + 1], so it maps to 0 there and the schema's bounds stay valid
    high = torch.where(high > low, high, low + 1)
    scaled = [(raw[index] - low) / (high - low) for index in rows]
    clipped = {name: int(((x < 0) | (x > 1)).sum()) for name, x in zip(("train", "val", "test"), scaled)}
    train, val, test = (Split(x.clamp(0.0, 1.0), y[index]) for x, index in zip(scaled, rows))
    return Dataset("breast-cancer", train, val, test, num_classes=2, default_model="mlp",
                   class_names=list(bunch.target_names),
                   metadata={"feature_names": list(bunch.feature_names),
                             "raw_min": low.tolist(), "raw_max": high.tolist(), "clipped": clipped})
