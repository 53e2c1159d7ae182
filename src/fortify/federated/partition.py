"""Split one training set among federated clients: IID shards or Dirichlet label skew.

Dirichlet partitions split each class among the clients (Yurochkin et al. 2019, "Bayesian
Nonparametric Federated Learning of Neural Networks", the scheme of Flower Datasets'
DirichletPartitioner): for each class a vector of client shares is drawn from Dir(alpha), and that
class's examples are dealt out in those proportions, so shard sizes vary too. (Hsu et al. 2019 draw
each client's class mix from Dir(alpha * prior) instead, at equal shard sizes.) Small alpha gives each
client few classes; large alpha approaches IID. Both are deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fortify.data.base import Split
from fortify.errors import ConfigError

# a Dirichlet draw can leave a client empty; redraw until every client holds this many examples
MIN_EXAMPLES_PER_CLIENT = 2
MAX_DRAWS = 100


def check_client_count(clients: int, n_examples: int) -> None:
    if clients < 1:
        raise ConfigError(f"the number of clients must be >= 1, got {clients}")
    if clients * MIN_EXAMPLES_PER_CLIENT > n_examples:
        raise ConfigError(f"{clients} clients need at least {clients * MIN_EXAMPLES_PER_CLIENT} "
                          f"training examples ({MIN_EXAMPLES_PER_CLIENT} each); the training split "
                          f"has {n_examples}: use at most {n_examples // MIN_EXAMPLES_PER_CLIENT} clients")


def iid_partition(split: Split, clients: int, *, seed: int = 0) -> list[Split]:
    """Shuffle once and deal out shards whose sizes differ by at most one."""
    return [_take(split, shard) for shard in _iid_indices(len(split), clients, seed)]


def dirichlet_partition(split: Split, clients: int, *, alpha: float, seed: int = 0) -> list[Split]:
    """Per class, client shares ~ Dir(alpha); every client ends with >= MIN_EXAMPLES_PER_CLIENT."""
    return [_take(split, shard) for shard in _dirichlet_indices(split.y, clients, alpha, seed)]


def partition(split: Split, clients: int, *, scheme: str, alpha: float = 0.5, seed: int = 0
              ) -> list[Split]:
    return [_take(split, shard) for shard in shard_indices(split.y, clients, scheme=scheme,
                                                            alpha=alpha, seed=seed)]


def shard_indices(labels: Tensor, clients: int, *, scheme: str, alpha: float = 0.5, seed: int = 0
                  ) -> list[Tensor]:
    """Each client's indices into the split; only the labels are read, so checking that a
    partition exists (and how large its shards are) copies no inputs."""
    if scheme == "iid":
        return _iid_indices(len(labels), clients, seed)
    if scheme == "dirichlet":
        return _dirichlet_indices(labels, clients, alpha, seed)
    raise ConfigError(f"unknown partition scheme {scheme!r}; valid: dirichlet, iid")


def _iid_indices(n: int, clients: int, seed: int) -> list[Tensor]:
    check_client_count(clients, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.tensor_split(clients))


def _dirichlet_indices(labels: Tensor, clients: int, alpha: float, seed: int) -> list[Tensor]:
    check_client_count(clients, len(labels))
    if not alpha > 0:
        raise ConfigError(f"the Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        shards = _dirichlet_draw(labels, clients, alpha, rng)
        if min(len(s) for s in shards) >= MIN_EXAMPLES_PER_CLIENT:
            return shards
    raise ConfigError(f"no Dirichlet(alpha={alpha:g}) partition in {MAX_DRAWS} draws (partition_seed "
                      f"{seed}) gave each of {clients} clients {MIN_EXAMPLES_PER_CLIENT} examples; "
                      "raise alpha (--alpha) or use fewer clients")


def _dirichlet_draw(labels: Tensor, clients: int, alpha: float, rng: np.random.Generator
                    ) -> list[Tensor]:
    parts: list[list[Tensor]] = [[] for _ in range(clients)]
    for cls in labels.unique():
        members = (labels == cls).nonzero().squeeze(1).numpy()
        members = rng.permutation(members)
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares) * len(members)).round().astype(int)[:-1]
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(torch.from_numpy(piece))
    return [torch.cat(p).sort().values for p in parts]


def _take(split: Split, index: Tensor) -> Split:
    return Split(split.x[index], split.y[index])
