"""The privacy tests' overfit MLPs on digits: their recipe and their data, in a fixed order."""

from __future__ import annotations

import torch

from fortify.config import AugmentConfig, TrainConfig
from fortify.data import Dataset, Split
from fortify.privacy import TrainerRecipe
from fortify.threat import ThreatModel


def overfit_recipe(val: Split, augment: AugmentConfig | None = None) -> TrainerRecipe:
    """Full-batch Adam, no weight decay, 150 epochs: about 100% train and 85% test accuracy."""
    config = TrainConfig(objective="standard", epochs=150, batch_size=1000, optimizer="adam", lr=0.02,
                         weight_decay=0.0, schedule="constant", early_stopping=False,
                         augment=augment or AugmentConfig())
    return TrainerRecipe.for_model("mlp", (1, 8, 8), 10, config=config,
                                   threat=ThreatModel("linf", 0.1), val=val)


def shuffled_digits(digits: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of digits' splits together, in one fixed random order."""
    x = torch.cat([digits.train.x, digits.val.x, digits.test.x])
    y = torch.cat([digits.train.y, digits.val.y, digits.test.y])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]
