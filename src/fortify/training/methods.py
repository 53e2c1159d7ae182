"""Training methods beyond PGD-AT, registered in ``OBJECTIVES``.

| name           | method                                                | settings read           |
|----------------|-------------------------------------------------------|-------------------------|
| ``trades``     | TRADES (Zhang et al. 2019)                            | trades_beta             |
| ``mart``       | MART (Wang et al. 2020)                               | mart_beta               |
| ``free``       | Free AT (Shafahi et al. 2019); divide epochs by m     | free_replays            |
| ``awp-pgd``    | AWP (Wu et al. 2020) around PGD-AT                    | awp_gamma               |
| ``awp-trades`` | AWP around TRADES                                     | awp_gamma, trades_beta  |
| ``pgd-mix``    | ``(1 - r) * CE(clean) + r * PGD-AT loss``             | mix_ratio               |

Every factory takes ``ObjectiveOptions``; the extra settings come from ``MethodOptions`` (a
subclass with paper defaults), so a plain ``ObjectiveOptions`` gives the defaults. Like every
objective they also read ``label_smoothing`` for their cross-entropy terms. The objectives validate
the values. ``objective_from_config`` builds any objective from a ``TrainConfig``.

Import order: ``objectives.py`` imports this module on its last line so that building any of these
names works after importing the registry alone. The method modules import ``objectives`` in turn,
so each factory imports its class when called, never at module level: a method module imported
first would otherwise be asked for a class it has not defined yet.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from fortify.training.objectives import OBJECTIVES, Objective, ObjectiveOptions, build_objective

if TYPE_CHECKING:
    from fortify.config import TrainConfig
    from fortify.threat import ThreatModel
    from fortify.training.awp import AWPObjective
    from fortify.training.free import FreeObjective
    from fortify.training.mart import MartObjective
    from fortify.training.paired import MixedObjective, PGDPairedObjective
    from fortify.training.trades import TradesObjective


@dataclass(frozen=True)
class MethodOptions(ObjectiveOptions):
    """``ObjectiveOptions`` plus the settings of the methods in this module, at paper defaults."""

    trades_beta: float = 6.0
    mart_beta: float = 6.0
    free_replays: int = 8
    awp_gamma: float = 5e-3
    awp_warmup_epochs: int = 0
    mix_ratio: float = 0.5
    noise_sigma: float = 0.25


def method_options(options: ObjectiveOptions) -> MethodOptions:
    """``options`` as ``MethodOptions``; the method settings default when ``options`` lacks them."""
    if isinstance(options, MethodOptions):
        return options
    return MethodOptions(**{f.name: getattr(options, f.name) for f in fields(options)})


def objective_from_config(config: TrainConfig, threat: ThreatModel) -> Objective:
    """``config.objective`` with every objective setting of ``config``, its seed included.

    Every ``MethodOptions`` field but the threat is read from the ``TrainConfig`` field of the same
    name, so that a pipeline run and the shadow and reference models that a privacy audit trains
    after it (``fortify.privacy.recipe``) build the same objective.
    """
    settings = {f.name: getattr(config, f.name) for f in fields(MethodOptions) if f.name != "threat"}
    return build_objective(config.objective, MethodOptions(threat, **settings))


def build_trades(options: ObjectiveOptions) -> TradesObjective:
    from fortify.training.trades import TradesObjective

    settings = method_options(options)
    return TradesObjective(settings, beta=settings.trades_beta)


def build_mart(options: ObjectiveOptions) -> MartObjective:
    from fortify.training.mart import MartObjective

    settings = method_options(options)
    return MartObjective(settings, beta=settings.mart_beta)


def build_free(options: ObjectiveOptions) -> FreeObjective:
    from fortify.training.free import FreeObjective

    settings = method_options(options)
    return FreeObjective(settings, replays=settings.free_replays)


def build_pgd(options: ObjectiveOptions) -> PGDPairedObjective:
    """PGD-AT in paired form (``craft``/``loss_on``); the base of awp-pgd and pgd-mix."""
    from fortify.training.paired import PGDPairedObjective

    return PGDPairedObjective(method_options(options))


def build_awp_pgd(options: ObjectiveOptions) -> AWPObjective:
    from fortify.training.awp import AWPObjective

    settings = method_options(options)
    return AWPObjective(build_pgd(options), gamma=settings.awp_gamma,
                        warmup_epochs=settings.awp_warmup_epochs)


def build_awp_trades(options: ObjectiveOptions) -> AWPObjective:
    from fortify.training.awp import AWPObjective

    settings = method_options(options)
    return AWPObjective(build_trades(options), gamma=settings.awp_gamma,
                        warmup_epochs=settings.awp_warmup_epochs)


def build_pgd_mix(options: ObjectiveOptions) -> MixedObjective:
    from fortify.training.paired import mixed

    return mixed(build_pgd(options), method_options(options).mix_ratio)


METHODS = {
    "trades": build_trades,
    "mart": build_mart,
    "free": build_free,
    "awp-pgd": build_awp_pgd,
    "awp-trades": build_awp_trades,
    "pgd-mix": build_pgd_mix,
}
for _name, _factory in METHODS.items():
    OBJECTIVES.add(_name, _factory)
