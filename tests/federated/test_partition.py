"""IID and Dirichlet partitions: disjoint, complete, deterministic, skewed as alpha says."""

from __future__ import annotations

import pytest
import torch

from fortify.data.base import Split
from fortify.errors import ConfigError
from fortify.federated.partition import dirichlet_partition, iid_partition, partition


def _labelled(n: int = 600, classes: int = 10) -> Split:
    """Inputs hold their own index, so a shard's examples can be traced back."""
    return Split(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % classes)


def _indices(shards: list[Split]) -> list[int]:
    return sorted(int(v) for s in shards for v in s.x[:, 0])


def _mean_top_class_share(shards: list[Split], classes: int = 10) -> float:
    return sum(float(s.y.bincount(minlength=classes).max()) / len(s) for s in shards) / len(shards)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_disjoint_cover_the_split_and_keep_labels(scheme):
    data = _labelled()
    shards = partition(data, 5, scheme=scheme, alpha=0.5, seed=3)
    assert len(shards) == 5
    assert _indices(shards) == list(range(len(data)))  # every example exactly once
    for shard in shards:
        assert torch.equal(shard.y, shard.x[:, 0].long() % 10)  # labels travel with their inputs


def test_iid_shard_sizes_differ_by_at_most_one_and_depend_on_the_seed():
    data = _labelled(603)
    shards = iid_partition(data, 4, seed=0)
    assert {len(s) for s in shards} <= {150, 151}
    again = iid_partition(data, 4, seed=0)
    other = iid_partition(data, 4, seed=1)
    assert all(torch.equal(a.x, b.x) for a, b in zip(shards, again))
    assert not torch.equal(shards[0].x, other[0].x)


def test_a_dirichlet_partition_depends_on_its_seed_alone():
    # every client and the server compute the partition themselves: the same seed must give it again
    data = _labelled(603)
    shards = partition(data, 4, scheme="dirichlet", alpha=0.5, seed=0)
    again = partition(data, 4, scheme="dirichlet", alpha=0.5, seed=0)
    other = partition(data, 4, scheme="dirichlet", alpha=0.5, seed=1)
    assert all(torch.equal(a.x, b.x) for a, b in zip(shards, again, strict=True))
    assert [len(s) for s in shards] != [len(s) for s in other]


def test_small_alpha_skews_labels_and_large_alpha_approaches_iid():
    data = _labelled(2000)
    skewed = dirichlet_partition(data, 4, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(data, 4, alpha=1000.0, seed=0)
    # uniform labels give a top-class share of 0.1; Dir(0.1) concentrates each client on few classes
    assert _mean_top_class_share(skewed) > 0.35
    assert _mean_top_class_share(near_iid) < 0.15
    assert all(len(s) >= 2 for s in skewed)


def test_more_clients_than_the_data_allows_is_refused_with_the_limit():
    with pytest.raises(ConfigError, match=r"1000 clients .* has 600: use at most 300 clients"):
        iid_partition(_labelled(), 1000)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_alpha_is_refused(bad):
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        dirichlet_partition(_labelled(), 3, alpha=bad)


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: dirichlet, iid"):
        partition(_labelled(), 3, scheme="shards")
