"""Splits: train, validation and test never share an example, and together hold every one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fortify.data import DataOptions, load_dataset
from fortify.data.base import carve_validation, split_arrays, split_indices
from fortify.errors import ConfigError


@settings(max_examples=200, deadline=None)
@given(n=st.integers(3, 500), val=st.floats(0.0, 0.6), test=st.floats(0.0, 0.6),
       seed=st.integers(0, 2**32), with_test=st.booleans())
def test_the_three_index_sets_are_disjoint_and_cover_every_example(n, val, test, seed, with_test):
    test = test if with_test else 0.0
    assume(val + test < 1)
    n_val, n_test = round(n * val), round(n * test)
    if n_val == 0 or (with_test and n_test == 0) or n_val + n_test >= n:  # a split would be empty
        with pytest.raises(ConfigError, match="leaves no|leave no training"):
            split_indices(n, val, test, seed, with_test=with_test)
        return
    train, validation, held_out = split_indices(n, val, test, seed, with_test=with_test)
    together = torch.cat([train, validation, held_out])
    assert sorted(together.tolist()) == list(range(n))  # each example exactly once
    assert len(validation) == round(n * val) and len(held_out) == round(n * test)
    assert len(train) > 0 and len(validation) > 0 and (len(held_out) > 0 or not with_test)


def test_split_arrays_and_carve_validation_keep_rows_whole_and_apart():
    # Prepare: rows numbered by their first feature, labels that name the row
    x = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(100)
    # Execute
    train, val, test = split_arrays(x, y, 0.2, 0.1, seed=4)
    carved, carved_val = carve_validation(train, 0.25, seed=4)
    # Assert: each row keeps its label, and no row is in two splits
    for part in (train, val, test, carved, carved_val):
        assert torch.equal(part.x[:, 0].long(), part.y)
    assert sorted(torch.cat([train.y, val.y, test.y]).tolist()) == list(range(100))
    assert sorted(torch.cat([carved.y, carved_val.y]).tolist()) == sorted(train.y.tolist())


def test_a_file_with_its_own_test_set_keeps_it_out_of_training_and_validation(tmp_path):
    # Prepare: training rows 0..59 and test rows 100..119, each row holding its own number
    rows = np.arange(60, dtype=np.float32)
    test_rows = np.arange(100, 120, dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=np.stack([rows, rows], 1) / 200, y=np.arange(60) % 2,
             x_test=np.stack([test_rows, test_rows], 1) / 200, y_test=np.arange(20) % 2)
    # Execute
    data = load_dataset("npz", DataOptions(path=tmp_path / "d.npz", val_fraction=0.2, seed=1))
    # Assert
    numbers = {name: set(torch.round(part.x[:, 0] * 200).long().tolist())
               for name, part in (("train", data.train), ("val", data.val), ("test", data.test))}
    assert numbers["test"] == set(range(100, 120))
    assert numbers["train"] | numbers["val"] == set(range(60))
    assert not numbers["train"] & numbers["val"]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_split_depends_on_its_seed_alone(seed):
    first = split_indices(50, 0.2, 0.2, seed)
    again = split_indices(50, 0.2, 0.2, seed)
    other = split_indices(50, 0.2, 0.2, seed + 7)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])



@pytest.mark.parametrize("n", [7, 10, 1797, 3597, 100_000])
def test_the_share_an_empty_split_error_suggests_makes_one_example(n):
    # it once suggested 0.5 / n, which rounds to no example (round half to even), and 0.05 of 10
    with pytest.raises(ConfigError, match="use at least") as caught:
        split_indices(n, 1e-9, 0.3, seed=0)
    suggested = float(str(caught.value).rsplit("use at least ", 1)[1])
    train, validation, _ = split_indices(n, suggested, 0.3, seed=0)
    assert len(validation) >= 1


def test_nothing_to_split_and_misused_split_helpers_are_clear_errors():
    from fortify.data.base import Split
    from fortify.errors import DataError

    with pytest.raises(DataError, match="no examples to split"):
        split_indices(0, 0.2, 0.2, seed=0)  # was a ZeroDivisionError
    with pytest.raises(DataError, match="labels must be a 1-D tensor, got shape \\(\\)"):
        Split(torch.zeros(3, 2), torch.tensor(1))  # was an IndexError
    with pytest.raises(DataError, match="a single number"):
        Split(torch.tensor(1.0), torch.zeros(1, dtype=torch.long))
    split = Split(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    assert len(split.head(0)) == 0 and len(split.head(5)) == 5
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        split.head(-1)  # would have dropped the last example
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(split.batches(0))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -2"):
        list(split.batches(-2))  # was no batch at all
