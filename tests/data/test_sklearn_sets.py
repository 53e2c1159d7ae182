"""The scikit-learn sets: breast-cancer is scaled by its training rows alone."""

from __future__ import annotations

import numpy as np
import sklearn.datasets
import torch

from fortify.data import load_dataset
from fortify.data.base import split_indices
from fortify.data.registry import DataOptions
from fortify.tabular.run import breast_cancer_schema, run_threat

OPTIONS = DataOptions()


def _rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return split_indices(569, OPTIONS.val_fraction, OPTIONS.test_fraction, OPTIONS.seed)


def test_breast_cancer_scaling_is_the_training_rows_range():
    # Prepare
    raw = torch.tensor(sklearn.datasets.load_breast_cancer().data, dtype=torch.float32)
    train_rows = raw[_rows()[0]]

    # Execute
    dataset = load_dataset("breast-cancer", OPTIONS)

    # Assert: the statistics are the training rows', and every split stays in the box
    assert dataset.metadata["raw_min"] == train_rows.min(dim=0).values.tolist()
    assert dataset.metadata["raw_max"] == train_rows.max(dim=0).values.tolist()
    for split in (dataset.train, dataset.val, dataset.test):
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    # the test split does reach outside the training range, and those values are counted
    clipped = dataset.metadata["clipped"]
    assert clipped["train"] == 0 and clipped["test"] > 0


def test_an_extreme_test_value_does_not_move_the_training_inputs(monkeypatch):
    # Prepare: the same data with one test row's first feature ten times the largest value
    before = load_dataset("breast-cancer", OPTIONS)
    bunch = sklearn.datasets.load_breast_cancer()
    row = int(_rows()[2][0])
    bunch.data = np.array(bunch.data)
    bunch.data[row, 0] = 10 * bunch.data[:, 0].max()
    monkeypatch.setattr(sklearn.datasets, "load_breast_cancer", lambda: bunch)

    # Execute
    after = load_dataset("breast-cancer", OPTIONS)

    # Assert: train and val inputs and the scaling are unchanged; the extreme is clipped to 1
    assert torch.equal(after.train.x, before.train.x) and torch.equal(after.val.x, before.val.x)
    assert after.metadata["raw_max"] == before.metadata["raw_max"]
    assert float(after.test.x[0, 0]) == 1.0
    newly_clipped = int(float(before.test.x[0, 0]) < 1.0)
    assert after.metadata["clipped"]["test"] == before.metadata["clipped"]["test"] + newly_clipped


def test_a_feature_constant_on_the_training_rows_maps_to_zero_and_keeps_a_valid_schema(monkeypatch):
    # Prepare: the first feature equal in every training row (a small split can make it so)
    bunch = sklearn.datasets.load_breast_cancer()
    bunch.data = np.array(bunch.data)
    train_rows, _, test_rows = (index.numpy() for index in _rows())
    bunch.data[train_rows, 0] = 7.0
    bunch.data[test_rows[0], 0], bunch.data[test_rows[1], 0] = 7.5, 9.0
    monkeypatch.setattr(sklearn.datasets, "load_breast_cancer", lambda: bunch)

    # Execute
    dataset = load_dataset("breast-cancer", OPTIONS)
    schema = breast_cancer_schema(dataset)

    # Assert: no division by a zero range; the range is one raw unit from the training value
    assert torch.equal(dataset.train.x[:, 0], torch.zeros(len(dataset.train.x)))
    assert dataset.test.x[0, 0] == 0.5 and dataset.test.x[1, 0] == 1.0  # 9.0 is clipped
    assert all(torch.isfinite(split.x).all() for split in (dataset.train, dataset.val, dataset.test))
    assert (schema.features[0].low, schema.features[0].high) == (7.0, 8.0)


def test_the_bundled_schema_bounds_are_the_training_scaling():
    # Prepare
    dataset = load_dataset("breast-cancer", OPTIONS)

    # Execute
    schema = breast_cancer_schema(dataset)
    run_threat("linf", 0.1, dataset, "breast-cancer")  # checks every split against the schema

    # Assert
    assert [f.low for f in schema.features] == dataset.metadata["raw_min"]
    assert [f.high for f in schema.features] == dataset.metadata["raw_max"]
