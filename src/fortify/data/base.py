"""In-memory datasets with deterministic splits.

fortify's datasets fit in memory as tensors, so batches are sliced straight from them: no worker
processes, and shuffling is driven by a seeded ``torch.Generator`` that a checkpoint can save.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fortify.attacks.base import check_label_range
from fortify.data.rows import shared_rows
from fortify.errors import ConfigError, DataError
from fortify.threat import check_in_box


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor``, made on the host, on ``device``; to a GPU through pinned memory, queued behind the
    work in flight. torch copies from pageable memory and then waits for the GPU's queue to drain, so
    a training step that copied so at each batch would leave the GPU idle while the host prepared the
    next batch. ``pin_memory`` copies an unpinned tensor, and torch keeps that block until the copy
    is done; a tensor already pinned is copied from itself, so its caller must not change it before
    the GPU has read it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.y.dim() != 1:
            raise DataError(f"labels must be a 1-D tensor, got shape {tuple(self.y.shape)}")
        if self.x.dim() == 0:
            raise DataError("inputs must hold one row per example, got a single number")
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all of them for None)."""
        if n is not None and n < 0:  # slicing would drop the last -n instead
            raise ValueError(f"the number of examples must be >= 0, got {n}")
        return self if n is None else Split(self.x[:n], self.y[:n])

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches in order, or shuffled by ``generator`` when one is given."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            if order is None:
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            else:
                idx = host_to_device(order[start:start + batch_size], self.x.device)
                yield self.x[idx], self.y[idx]


def splits_sha256(splits: Sequence[Split | None]) -> str:
    """SHA-256 of the examples and labels of ``splits`` in order (None for a split not given): the
    data as a run saw it, so that a file changed under the same path is noticed."""
    digest = hashlib.sha256()
    for split in splits:
        tensors = () if split is None else (split.x, split.y)
        digest.update(f"split {len(tensors)};".encode())
        for tensor in tensors:
            flat = tensor.detach().cpu().contiguous()
            digest.update(f"{flat.dtype} {tuple(flat.shape)};".encode())
            digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Dataset:
    """Train/validation/test splits plus what a model and threat model need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    bounds: tuple[float, float] = (0.0, 1.0)
    default_model: str = "small-cnn"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    def sha256(self) -> str:
        """The SHA-256 of the three splits' examples and labels (``splits_sha256``)."""
        return splits_sha256((self.train, self.val, self.test))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def validate(self) -> Dataset:
        """Check every split against the box, finiteness and label range."""
        for split_name in ("train", "val", "test"):
            split: Split = getattr(self, split_name)
            if len(split) == 0:
                raise DataError(f"dataset {self.name!r}: the {split_name} split is empty")
            try:
                check_in_box(split.x, self.bounds)
                check_label_range(split.y, self.num_classes)
            except DataError as err:
                raise DataError(f"dataset {self.name!r}, {split_name} split: {err}") from None
            if tuple(split.x.shape[1:]) != self.input_shape:
                raise DataError(f"dataset {self.name!r}: {split_name} inputs have shape "
                                f"{tuple(split.x.shape[1:])}, train has {self.input_shape}")
        return self

    def inputs_also_in_training(self) -> dict[str, int]:
        """How many validation and test inputs equal a training input exactly, under any label: a
        split drawn by position from data with duplicate rows holds copies of training examples, and
        accuracy on those measures memory rather than generalisation."""
        return {name: len(shared_rows(getattr(self, name).x, self.train.x)) for name in ("val", "test")}

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "bounds": list(self.bounds),
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                **({"class_names": list(self.class_names)} if self.class_names else {}), **self.metadata}


def _one_example(n: int) -> str:
    """The share of ``n`` examples that makes one example, written so that it does (rounded up)."""
    share = 1 / n
    for digits in range(3, 18):
        written = f"{math.ceil(share * 10 ** digits) / 10 ** digits:.{digits}g}"
        if round(n * float(written)) >= 1:
            return written
    return repr(share)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, *, with_test: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic shuffled train/val/test index sets from ``seed``; each non-empty (the test set
    only ``with_test``: data that ship a test set of their own draw none), or a ConfigError naming
    the fraction that empties it."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if n < 1:
        raise DataError("there are no examples to split into train, validation and test sets")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n_val == 0:  # training validates after every epoch
        raise ConfigError(f"val_fraction={val_fraction} of {n} examples leaves no validation example; "
                          f"use at least {_one_example(n)}")
    if with_test and n_test == 0:
        raise ConfigError(f"test_fraction={test_fraction} of {n} examples leaves no test example; "
                          f"use at least {_one_example(n)}")
    if n_test + n_val >= n:
        raise ConfigError(f"val_fraction={val_fraction} and test_fraction={test_fraction} of {n} examples "
                          "leave no training example")
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def split_arrays(x: Tensor, y: Tensor, val_fraction: float, test_fraction: float, seed: int
                 ) -> tuple[Split, Split, Split]:
    train, val, test = split_indices(len(x), val_fraction, test_fraction, seed)
    return Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test])


def carve_validation(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a fixed training set (one that ships with its own test set) into train and val."""
    tr, va, _ = split_indices(len(train), val_fraction, 0.0, seed, with_test=False)
    return Split(train.x[tr], train.y[tr]), Split(train.x[va], train.y[va])
