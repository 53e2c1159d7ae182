"""Training recipes for shadow and reference models: the target's own recipe, replayed on other data.

Shokri et al. 2017 and Carlini et al. 2022 both assume the attacker can train models the way the
target was trained. A recipe is any callable ``recipe(train, seed=...) -> model``; the default one
uses fortify's Trainer with a TrainConfig, so an audit of a fortify run trains its shadow models with
the run's own objective, optimiser, schedule and epochs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fortify.config import DPConfig, TrainConfig
from fortify.data.base import Split
from fortify.errors import ConfigError
from fortify.models import build_model
from fortify.privacy._data import model_device, model_dtype
from fortify.threat import ThreatModel
from fortify.training.methods import objective_from_config
from fortify.training.objectives import Objective
from fortify.training.trainer import Trainer

# the Trainer validates every epoch; without a held-out split it checks this many training examples
_SELF_VALIDATION_SIZE = 256


class TrainRecipe(Protocol):
    """Builds a fresh model and trains it on ``train``; ``seed`` fixes its initialisation and order."""

    def __call__(self, train: Split, *, seed: int) -> nn.Module: ...


@dataclass
class TrainerRecipe:
    """Train ``model_factory()`` with fortify's Trainer under ``config`` and ``threat``.

    ``val`` is the split the Trainer validates and (with early stopping) selects on; without one it
    validates on the first training examples, which mirrors a recipe without early stopping only.
    With ``dp`` (enabled) the models train with DP-SGD as the run's DPTrainer does: BatchNorm
    replaced by GroupNorm, each example's gradient clipped, noise for the same guarantee on the
    reference model's own training set (``dp.target_epsilon``) or the same noise multiplier.
    """

    model_factory: Callable[[], nn.Module]
    config: TrainConfig
    threat: ThreatModel
    val: Split | None = None
    device: str | torch.device = "cpu"
    dp: DPConfig | None = None

    def __call__(self, train: Split, *, seed: int) -> nn.Module:
        device = torch.device(self.device)
        # the caller's random state comes back afterwards: a shadow or reference model is an aside
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._train(train, seed)

    def _train(self, train: Split, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self.model_factory().to(self.device)
        config = self.config.model_copy(update={"seed": int(seed)})
        # every objective setting of the config (trades_beta, label_smoothing, ...), as the run had
        objective = objective_from_config(config, self.threat)
        trainer = (Trainer(model, objective, config, threat=self.threat, show_progress=False)
                   if self.dp is None or not self.dp.enabled else
                   _dp_trainer(model, objective, config, self.dp, self.threat))
        val = self.val if self.val is not None else train.head(_SELF_VALIDATION_SIZE)
        # in the model's dtype, as every prediction of the attacks reads inputs (float64 from numpy)
        dtype = model_dtype(model, train.x.dtype)
        trainer.fit(*(Split(part.x.to(dtype), part.y) for part in (train, val)))
        return trainer.model.eval()  # under DP the copy with its BatchNorm replaced

    @classmethod
    def like(cls, model: nn.Module, *, config: TrainConfig | None = None,
             threat: ThreatModel | None = None, val: Split | None = None) -> TrainerRecipe:
        """The recipe for ``model``'s architecture: a copy with every layer re-initialised.

        Without ``config`` it trains with fortify's default standard recipe; pass the target's own
        TrainConfig when it is known, since shadow models should be trained the way the target was.
        A model with parameters that no ``reset_parameters`` (or ``_reset_parameters``, as
        ``nn.MultiheadAttention`` has) re-initialises is refused: its copies would start from the
        target's trained weights, which hold what it memorised of its members.
        """
        template = copy.deepcopy(model).cpu()
        unresettable = [f"{name or 'the model'} ({type(module).__name__})"
                        for name, module in template.named_modules()
                        if next(module.parameters(recurse=False), None) is not None
                        and _reset_method(module) is None]
        if unresettable:
            raise ConfigError(f"TrainerRecipe.like cannot re-initialise the parameters of module(s) "
                              f"{', '.join(unresettable)} (no reset_parameters method), so the shadow "
                              "and reference models would start from the trained weights; pass "
                              "recipe=TrainerRecipe(model_factory, config, threat) with a factory that "
                              "builds the architecture afresh")

        def factory() -> nn.Module:
            fresh = copy.deepcopy(template)
            for module in fresh.modules():
                reset = _reset_method(module)
                if reset is not None:
                    reset()
            return fresh

        return cls(factory, config or TrainConfig(objective="standard"), threat or ThreatModel(),
                   val=val, device=model_device(model))

    @classmethod
    def for_model(cls, name: str, input_shape: Sequence[int], num_classes: int, *,
                  config: TrainConfig, threat: ThreatModel, val: Split | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  device: str | torch.device = "cpu", dp: DPConfig | None = None) -> TrainerRecipe:
        """The recipe for a registered architecture, e.g. from a run's ``model.json`` card."""
        def factory() -> nn.Module:
            return build_model(name, input_shape, num_classes, mean=mean, std=std)

        return cls(factory, config, threat, val=val, device=device, dp=dp)


def _dp_trainer(model: nn.Module, objective: Objective, config: TrainConfig, dp: DPConfig,
                threat: ThreatModel) -> Trainer:
    from fortify.training.dp import DPTrainer  # imports Opacus

    return DPTrainer(model, objective, config, dp=dp, threat=threat, show_progress=False)


def _reset_method(module: nn.Module) -> Callable[[], None] | None:
    """The method that re-initialises ``module``'s own parameters, if it has one."""
    return getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
