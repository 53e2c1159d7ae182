"""Privacy fixtures: a zoo of deliberately overfit MLPs on digits, trained by fortify's Trainer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from overfit import overfit_recipe, shuffled_digits

from fortify.data import Dataset, Split
from fortify.privacy import ReferenceModels, TrainerRecipe, train_reference_models

POOL_SIZE = 200  # each zoo model trains on about half: a small set it can memorise
ZOO_SIZE = 9  # every model serves in turn as the target, the other 8 as its reference models


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models here are tiny: one thread beats two that fight over two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Zoo:
    pool: Split  # what the zoo models train on (random halves of it)
    unseen: Split  # digits no zoo model ever saw
    models: ReferenceModels
    recipe: TrainerRecipe

    def target(self, index: int) -> tuple[torch.nn.Module, Split, Split, ReferenceModels]:
        """Model ``index`` as the target: its members, its non-members, the others as references."""
        keep = self.models.keep[index]
        others = [m for i, m in enumerate(self.models.models) if i != index]
        rest = torch.arange(len(self.models.models)) != index
        references = ReferenceModels(others, self.pool, self.models.keep[rest])
        return (self.models.models[index], Split(self.pool.x[keep], self.pool.y[keep]),
                Split(self.pool.x[~keep], self.pool.y[~keep]), references)


@pytest.fixture(scope="session")
def zoo(digits: Dataset) -> Zoo:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = shuffled_digits(digits)
        pool, unseen = Split(x[:POOL_SIZE], y[:POOL_SIZE]), Split(x[POOL_SIZE:], y[POOL_SIZE:])
        recipe = overfit_recipe(val=unseen.head(32))
        models = train_reference_models(pool, recipe, n_models=ZOO_SIZE, seed=7)
    finally:
        torch.set_num_threads(before)
    return Zoo(pool, unseen, models, recipe)

