"""The privacy audit of one model: membership attacks, optional inversion and gradient leakage.

``audit`` runs the chosen membership attacks against ``model`` on its members (training data) and
non-members (data it never saw) and collects the results in a PrivacyReport, the dataclass the HTML
report is rendered from. Model inversion and gradient leakage need other inputs (an evaluation model,
a client batch) and are attached by their own functions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fortify.data.base import Dataset, Split
from fortify.data.rows import input_groups, shared_rows
from fortify.errors import ConfigError, DataError
from fortify.privacy._data import check_member_sets, check_split, join
from fortify.privacy.inversion import InversionReport, model_inversion
from fortify.privacy.label_only import (
    augmentation_attack,
    boundary_distance_attack,
    hopskipjump_boundary_distance,
)
from fortify.privacy.lira import (
    SINGLE_QUERY,
    LiraQueries,
    ReferenceModels,
    check_queries_fit,
    lira_attack,
    train_reference_models,
)
from fortify.privacy.membership import shadow_attack, threshold_attack
from fortify.privacy.metrics import MembershipResult
from fortify.privacy.recipe import TrainerRecipe, TrainRecipe
from fortify.privacy.reconstruction import ReconstructionReport, leakage_sweep
from fortify.threat import check_in_box, checked_bounds

PRIVACY_REPORT_VERSION = 1
DEFAULT_ATTACKS: tuple[str, ...] = ("loss", "confidence", "modified-entropy", "augmentation")
# boundary runs HopSkipJump (1,000 label queries) per example
COSTLY_ATTACKS: tuple[str, ...] = ("boundary",)
TRAINED_ATTACKS: tuple[str, ...] = ("shadow", "lira-online", "lira-offline")
ATTACK_NAMES: tuple[str, ...] = DEFAULT_ATTACKS + COSTLY_ATTACKS + TRAINED_ATTACKS


@dataclass
class PrivacyReport:
    """Everything the privacy section of a report shows, JSON-serialisable via ``to_dict``."""

    n_members: int
    n_nonmembers: int
    membership: list[MembershipResult]
    inversion: InversionReport | None = None
    reconstruction: list[ReconstructionReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    version: int = PRIVACY_REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "n_members": self.n_members,
                "n_nonmembers": self.n_nonmembers,
                "membership": [m.to_dict() for m in self.membership],
                "inversion": None if self.inversion is None else self.inversion.to_dict(),
                "reconstruction": [r.to_dict() for r in self.reconstruction],
                "warnings": list(self.warnings), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        if data.get("version") != PRIVACY_REPORT_VERSION:
            raise DataError(f"privacy report version {data.get('version')!r} is not "
                            f"{PRIVACY_REPORT_VERSION}, the version this fortify reads")
        inversion = data.get("inversion")
        return cls(n_members=data["n_members"], n_nonmembers=data["n_nonmembers"],
                   membership=[MembershipResult.from_dict(m) for m in data["membership"]],
                   inversion=None if inversion is None else InversionReport.from_dict(inversion),
                   reconstruction=[ReconstructionReport.from_dict(r) for r in data["reconstruction"]],
                   warnings=list(data["warnings"]), seconds=data["seconds"], version=data["version"])

    def result(self, attack: str) -> MembershipResult:
        for result in self.membership:
            if result.attack == attack:
                return result
        raise KeyError(attack)

    def strongest(self) -> MembershipResult:
        """The attack with the highest AUC (the one the report's verdict and trade-off plot name);
        the TPR at the lowest reported FPR breaks ties."""
        def key(result: MembershipResult) -> tuple[float, float]:
            lowest = min(result.tpr_at_fpr, key=float) if result.tpr_at_fpr else None
            return (result.auc, result.tpr_at_fpr[lowest] if lowest is not None else 0.0)

        return max(self.membership, key=key)


def remove_overlap(members: Split, non_members: Split) -> tuple[Split, int]:
    """``non_members`` without the inputs that also appear among ``members``, and how many went."""
    check_split(members, "members")
    check_split(non_members, "non-members")
    duplicated = torch.zeros(len(non_members), dtype=torch.bool)
    duplicated[shared_rows(non_members.x, members.x)[:, 0]] = True
    kept = ~duplicated
    return Split(non_members.x[kept], non_members.y[kept]), int(duplicated.sum())


def _check_attack_names(attacks: Sequence[str], n_reference_models: int, shadow_pool: Split | None
                        ) -> None:
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ConfigError(f"unknown privacy attack(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(ATTACK_NAMES)}")
    if "lira-online" in attacks and n_reference_models < 2:
        raise ConfigError(f"lira-online needs n_reference_models >= 2, got {n_reference_models}")
    # offline LiRA fits each candidate's OUT models, and with one reference model about half of the
    # candidates (those it trained on) would have none
    if "lira-offline" in attacks and n_reference_models < 2:
        raise ConfigError(f"lira-offline needs n_reference_models >= 2, got {n_reference_models}")
    if "shadow" in attacks and shadow_pool is None:
        raise ConfigError("the shadow attack needs shadow_pool=<Split> of data the attacker owns")


def audit(model: nn.Module, members: Split, non_members: Split, *,
          attacks: Sequence[str] = DEFAULT_ATTACKS, recipe: TrainRecipe | None = None,
          n_reference_models: int = 0, reference_pool: Split | None = None,
          shadow_pool: Split | None = None, n_shadows: int = 4,
          lira_queries: LiraQueries = SINGLE_QUERY, fprs: Sequence[float] | None = None,
          bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> PrivacyReport:
    """Run membership ``attacks`` against ``model`` and collect a PrivacyReport.

    Attacks: ``loss``, ``confidence``, ``modified-entropy`` (thresholds), ``augmentation``
    (label-only; shifts only for image batches), ``boundary`` (label-only, HopSkipJump distances;
    costly, so not among the defaults), and the attacks that train models with ``recipe``: ``shadow`` (needs
    ``shadow_pool``) and ``lira-online``/``lira-offline`` (reference models trained on halves of the
    members, non-members and ``reference_pool``; ``lira_queries`` the views of each example that
    LiRA queries, see ``LiraQueries``). Without a recipe they use
    ``TrainerRecipe.like(model)``. ``fprs=None`` reports TPR at 0.1% and 1% FPR where there are enough
    non-members, with a warning for each one left out.
    """
    _check_attack_names(attacks, n_reference_models, shadow_pool)
    check_member_sets(members, non_members)
    bounds = checked_bounds(bounds)
    for split in (members, non_members):  # the box the label-only attacks clip to and search in
        check_in_box(split.x, bounds)
    if any(a.startswith("lira") for a in attacks):
        check_queries_fit(lira_queries, members.x)  # before any reference model trains
    if recipe is None and any(a in TRAINED_ATTACKS for a in attacks):
        recipe = TrainerRecipe.like(model)
    start = time.perf_counter()
    runners = _runners(members, non_members, recipe=recipe, n_reference_models=n_reference_models,
                       reference_pool=reference_pool, shadow_pool=shadow_pool, n_shadows=n_shadows,
                       lira_queries=lira_queries, fprs=fprs, bounds=bounds, seed=seed)
    results = [runners[name](model) for name in attacks]
    warnings = sorted({note for r in results for note in r.notes})
    return PrivacyReport(n_members=len(members), n_nonmembers=len(non_members), membership=results,
                         warnings=warnings, seconds=time.perf_counter() - start)


def _runners(members: Split, non_members: Split, *, recipe: TrainRecipe | None,
             n_reference_models: int, reference_pool: Split | None, shadow_pool: Split | None,
             n_shadows: int, lira_queries: LiraQueries, fprs: Sequence[float] | None,
             bounds: tuple[float, float], seed: int) -> dict[str, Callable[[nn.Module], MembershipResult]]:
    """One callable per attack name; reference models are trained once, on first use."""
    references: list[ReferenceModels] = []

    def lira(model: nn.Module, online: bool) -> MembershipResult:
        if not references:
            assert recipe is not None
            references.append(train_reference_models(
                _reference_pool(members, non_members, reference_pool), recipe,
                n_models=n_reference_models, seed=seed))
        return lira_attack(model, members, non_members, references[0], online=online,
                           queries=lira_queries, fprs=fprs)

    is_image = members.x.dim() == 4
    runners: dict[str, Callable[[nn.Module], MembershipResult]] = {
        name: (lambda m, s=name: threshold_attack(m, members, non_members, statistic=s, fprs=fprs))
        for name in ("loss", "confidence", "modified-entropy")}
    runners["augmentation"] = lambda m: augmentation_attack(
        m, members, non_members, max_shift=1 if is_image else 0, flip=False,
        noise_std=0.05 * (bounds[1] - bounds[0]), noise_copies=8, bounds=bounds, seed=seed, fprs=fprs)
    distance = functools.partial(hopskipjump_boundary_distance, norm="l2", bounds=bounds, seed=seed)
    runners["boundary"] = lambda m: boundary_distance_attack(m, members, non_members,
                                                             distance_fn=distance, fprs=fprs)
    runners["lira-online"] = lambda m: lira(m, True)
    runners["lira-offline"] = lambda m: lira(m, False)
    runners["shadow"] = lambda m: shadow_attack(
        m, members, non_members, shadow_pool=shadow_pool, recipe=recipe, n_shadows=n_shadows,
        seed=seed, fprs=fprs)  # type: ignore[arg-type]
    return runners


def _reference_pool(members: Split, non_members: Split, extra: Split | None) -> Split:
    """Members, non-members and the extra data: LiRA's candidates must all be in its pool."""
    candidates, _ = join(members, non_members)
    if extra is None or len(extra) == 0:  # every training example a member, validation held back
        return candidates
    check_split(extra, "reference pool")
    extra, _ = remove_overlap(candidates, extra)  # a candidate twice would weigh double in training
    return Split(torch.cat([candidates.x, extra.x]), torch.cat([candidates.y, extra.y]))


def audit_trained_model(model: nn.Module, dataset: Dataset, *, recipe: TrainRecipe | None = None,
                        attacks: Sequence[str] | None = None, n_reference_models: int = 0,
                        n_examples: int | None = None, lira_queries: LiraQueries = SINGLE_QUERY,
                        evaluator: nn.Module | None = None, inversion: bool = True,
                        leakage_batch_sizes: Sequence[int] = (), leakage_steps: int = 500,
                        fprs: Sequence[float] | None = None, seed: int = 0,
                        extra_data: Split | None = None) -> PrivacyReport:
    """The privacy section of a run: ``model`` against its own dataset.

    Members are the training split, non-members the test split (each cut to ``n_examples``; inputs
    of the test split that also occur in training are dropped, with a warning). Inputs of
    ``extra_data`` (``train.extra_data``, which the model and any reference model trained on besides
    the training split) leave both sides, with a warning: as a non-member such an input was trained
    on, and LiRA has no OUT reference model for it. With
    ``n_reference_models >= 2`` LiRA runs too, its reference models trained by ``recipe`` (the
    target's recipe; default ``TrainerRecipe.like(model)``) on halves of members, non-members, the
    training examples past ``n_examples`` and the validation split, less the examples the recipe
    validates on (as the target, a reference model selects its epoch on data it did not train on);
    LiRA queries the views ``lira_queries`` of each example (``LiraQueries.like_training`` gives
    those that the recipe's augmentations train on). ``inversion`` runs MI-Face on image data,
    judged by ``evaluator`` when given (for instance the run's other model); ``leakage_batch_sizes``
    adds gradient reconstructions of the first test examples, clean and under DP noise.
    """
    dataset, in_extra = _without_extra_data(dataset, extra_data)
    members = dataset.train.head(n_examples)
    # against the whole training split: the model trained on every example of it, not only the
    # members the attacks score
    non_members, dropped = remove_overlap(dataset.train, dataset.test)
    non_members = non_members.head(n_examples)
    if attacks is None:
        lira = ("lira-online", "lira-offline") if n_reference_models >= 2 else ()
        attacks = DEFAULT_ATTACKS + lira
    extra = _spare_data(dataset, len(members))
    recipe_val = getattr(recipe, "val", None)
    if recipe_val is not None:  # reference models select their epoch on it: they must not train on it
        extra, _ = remove_overlap(recipe_val, extra)
    report = audit(model, members, non_members, attacks=attacks, recipe=recipe,
                   n_reference_models=n_reference_models, reference_pool=extra,
                   lira_queries=lira_queries, fprs=fprs, bounds=dataset.bounds, seed=seed)
    if any(a.startswith("lira") for a in attacks):
        _note_reference_size(report, _reference_pool(members, non_members, extra), len(dataset.train))
    if dropped:
        report.warnings.append(f"{dropped} test input(s) also occur in the training split and were "
                               "left out of the non-members")
    if any(in_extra):
        report.warnings.append(f"{in_extra[0]} training and {in_extra[1]} test input(s) also occur in "
                               "train.extra_data and were left out of the members and non-members: "
                               "the model trained on them as extra data, as every LiRA reference "
                               "model would")
    if inversion and members.x.dim() == 4:
        report.inversion = model_inversion(model, dataset.train, evaluator=evaluator,
                                           bounds=dataset.bounds)
    if leakage_batch_sizes:
        report.reconstruction = leakage_sweep(model, dataset.test.x, dataset.test.y,
                                              batch_sizes=leakage_batch_sizes, bounds=dataset.bounds,
                                              seed=seed, steps=leakage_steps)
    return report


def _without_extra_data(dataset: Dataset, extra: Split | None) -> tuple[Dataset, tuple[int, int]]:
    """``dataset`` without the training and test inputs that occur in ``extra``, and how many went."""
    if extra is None or len(extra) == 0:
        return dataset, (0, 0)
    check_split(extra, "extra data")
    train, in_train = remove_overlap(extra, dataset.train)
    test, in_test = remove_overlap(extra, dataset.test)
    return replace(dataset, train=train, test=test), (in_train, in_test)


def _spare_data(dataset: Dataset, n_members: int) -> Split:
    """Data the reference models may train on besides the candidates: the training examples that
    are not candidates and the validation split (an attacker may own any data of the distribution)."""
    train, val = dataset.train, dataset.val
    return Split(torch.cat([train.x[n_members:], val.x]), torch.cat([train.y[n_members:], val.y]))


def _note_reference_size(report: PrivacyReport, pool: Split, target_size: int) -> None:
    """Carlini et al. train reference models on as many examples as the target; fewer fit their
    examples more closely, which moves LiRA's IN and OUT statistics."""
    reference_size = (int(input_groups(pool.x).max()) + 1) // 2  # distinct inputs, as they are split
    if reference_size < 0.9 * target_size:
        report.warnings.append(f"LiRA's reference models trained on about {reference_size} examples each, "
                               f"the model on {target_size}: with more data for the reference pool LiRA "
                               "would compare like with like")
