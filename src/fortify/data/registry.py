"""The dataset registry: a name maps to ``factory(options) -> Dataset``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fortify.registry import Registry


@dataclass(frozen=True)
class DataOptions:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    cache_dir: Path = Path.home() / ".cache" / "fortify"
    path: Path | None = None
    download: bool = True


DATASETS: Registry[Callable[[DataOptions], object]] = Registry("dataset")
