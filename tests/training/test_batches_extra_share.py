"""The extra-data share of a batch: a positive extra_fraction must put extra examples in it."""

from __future__ import annotations

import pytest

from fortify.config import TrainConfig
from fortify.data import Dataset, Split
from fortify.errors import ConfigError
from fortify.training.batches import load_recipe_data
from fortify.training.extra_data import BatchPlan


@pytest.mark.parametrize(("batch_size", "fraction"), [(8, 0.05), (2, 0.25), (64, 0.005)])
def test_a_fraction_that_rounds_to_no_extra_example_is_refused(batch_size, fraction):
    # round(batch_size * fraction) == 0: the run would load the extra data and never train on it
    with pytest.raises(ConfigError, match=f"extra_fraction={fraction} gives no extra example in a batch "
                                          f"of {batch_size}"):
        BatchPlan.for_batch(batch_size, fraction)


def test_the_smallest_fraction_that_rounds_to_one_extra_example_is_accepted():
    assert BatchPlan.for_batch(8, 0.07) == BatchPlan(7, 1)  # round(0.56) = 1


def test_the_share_is_checked_before_the_extra_file_is_read(tmp_path, digits: Dataset):
    # the file does not exist: the share's error comes first, before any data is loaded
    config = TrainConfig(batch_size=8, extra_data=tmp_path / "missing.npz", extra_fraction=0.05)
    small = Dataset("digits", Split(digits.train.x[:4], digits.train.y[:4]), digits.val, digits.test,
                    num_classes=digits.num_classes)
    with pytest.raises(ConfigError, match="gives no extra example"):
        load_recipe_data(config, small, dp=False)
