"""Empirical privacy audit with canaries: a lower bound on epsilon beside the accountant's upper bound.

The recipe of Jagielski et al. 2020 ("Auditing Differentially Private Machine Learning: How Private
is Private SGD?") and Nasr et al. 2021 ("Adversary Instantiation"):

1. Take ``2m`` examples out of the training data and give each a random wrong label (a canary the
   model can only fit by memorising it). Insert a random half; hold the other half out.
2. Train. Score every canary by its loss under its canary label (Yeom et al. 2018): low loss, member.
3. A threshold on the score is a test "inserted or not". (epsilon, delta)-DP bounds every such test:
   ``TPR <= e^eps * FPR + delta`` and ``1 - FPR <= e^eps * (1 - TPR) + delta``. With Clopper-Pearson
   bounds on the measured rates (TPR from below, FPR from above), the inequalities give an epsilon
   that the training cannot be below, at the stated confidence.

The threshold is chosen on a random half of the canaries and the bound is computed on the other half,
so choosing the best of many thresholds does not inflate it. A sound DP implementation keeps the lower
bound at or below the accountant's upper bound; one above it means the accounting or the
implementation is wrong.

All canaries are inserted in one training run and counted as independent trials, as in the papers'
multi-canary audits; this is a heuristic for DP-SGD (Steinke et al. 2023 give the rigorous one-run
analysis, whose bound is lower).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy.stats import beta
from torch import Tensor, nn

from fortify.attacks.base import check_label_range
from fortify.data.base import Split
from fortify.errors import ConfigError, DataError
from fortify.privacy._data import model_device, predict_logits
from fortify.privacy.membership import loss_scores
from fortify.privacy.metrics import auc


@dataclass
class Canaries:
    """Mislabelled examples; ``inserted[i]`` says whether canary ``i`` is in the training data."""

    x: Tensor
    y: Tensor  # the canary (wrong) labels
    inserted: Tensor  # bool

    @property
    def members(self) -> Split:
        return Split(self.x[self.inserted], self.y[self.inserted])


def insert_canaries(train: Split, per_side: int, num_classes: int, *, seed: int) -> tuple[Split, Canaries]:
    """Training data with ``per_side`` canaries inserted, and all ``2 * per_side`` canaries.

    The canaries' originals leave the training data, so a held-out canary was never seen in any form.
    """
    if isinstance(per_side, bool) or not isinstance(per_side, numbers.Integral) or per_side < 2:
        raise ConfigError(f"canaries per side must be an integer >= 2 (the audit halves each side), got "
                          f"{per_side!r}")
    if 4 * per_side > len(train):
        raise ConfigError(f"{per_side} canaries per side need at least {4 * per_side} training "
                          f"examples (2 * {per_side} canaries and as many real ones); got {len(train)}")
    if num_classes < 2:
        raise ConfigError(f"canaries need at least 2 classes to mislabel, got {num_classes}")
    check_label_range(train.y, num_classes)  # a label past them would give a canary no class at all
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    chosen, kept = order[:2 * per_side], order[2 * per_side:]
    shift = torch.randint(1, num_classes, (2 * per_side,), generator=generator)
    wrong = (train.y[chosen] + shift) % num_classes  # never the true label
    inserted = torch.zeros(2 * per_side, dtype=torch.bool)
    inserted[torch.randperm(2 * per_side, generator=generator)[:per_side]] = True
    canaries = Canaries(train.x[chosen], wrong, inserted)
    members = canaries.members
    return Split(torch.cat([train.x[kept], members.x]), torch.cat([train.y[kept], members.y])), canaries


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Exact binomial interval: each end holds with probability at least ``1 - (1 - confidence) / 2``."""
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def epsilon_from_rates(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The smallest epsilon that (epsilon, delta)-DP allows for a test with these rates (>= 0)."""
    candidates = [0.0]
    if tpr_low - delta > 0:
        candidates.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high - delta > 0 and tpr_low < 1:
        candidates.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(candidates)


@dataclass
class CanaryAudit:
    """The audit's numbers; ``epsilon_lower`` holds with probability ``confidence``."""

    n_inserted: int
    n_held_out: int
    threshold: float  # member if -loss >= threshold
    tpr: float  # on the evaluation half
    fpr: float
    tpr_low: float
    fpr_high: float
    epsilon_lower: float
    epsilon_upper: float | None  # the accountant's, when the model was trained with DP
    delta: float
    confidence: float
    auc: float  # all canaries, for comparison with membership AUCs elsewhere

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rates(member: Tensor, nonmember: Tensor, threshold: float) -> tuple[int, int]:
    return int((member >= threshold).sum()), int((nonmember >= threshold).sum())


def _bound_at(member: Tensor, nonmember: Tensor, threshold: float, delta: float, confidence: float
              ) -> tuple[float, float, float]:
    hits, false_alarms = _rates(member, nonmember, threshold)
    tpr_low, _ = clopper_pearson(hits, len(member), confidence)
    _, fpr_high = clopper_pearson(false_alarms, len(nonmember), confidence)
    return epsilon_from_rates(tpr_low, fpr_high, delta), tpr_low, fpr_high


def audit_canaries(model: nn.Module, canaries: Canaries, *, delta: float, epsilon_upper: float | None = None,
                   confidence: float = 0.95, seed: int = 0) -> CanaryAudit:
    """Membership inference on the canaries of a model trained with ``insert_canaries``' data."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")
    inserted = canaries.inserted
    if int(inserted.sum()) < 2 or int((~inserted).sum()) < 2:
        raise DataError("the audit needs at least 2 inserted and 2 held-out canaries to split them into "
                        f"threshold and evaluation halves; got {int(inserted.sum())} and "
                        f"{int((~inserted).sum())}")
    logits = predict_logits(model, canaries.x)
    check_label_range(canaries.y, logits.shape[1])  # canaries of another model's classes
    scores = loss_scores(logits, canaries.y.to(model_device(model))).cpu()
    halves = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed)) < 0.5
    choose, judge = _halves(halves, inserted)
    threshold = max(scores[choose].unique().tolist(), key=lambda t: _bound_at(
        scores[choose & inserted], scores[choose & ~inserted], t, delta, confidence)[0])
    member, nonmember = scores[judge & inserted], scores[judge & ~inserted]
    epsilon_lower, tpr_low, fpr_high = _bound_at(member, nonmember, threshold, delta, confidence)
    hits, false_alarms = _rates(member, nonmember, threshold)
    return CanaryAudit(
        n_inserted=int(inserted.sum()), n_held_out=int((~inserted).sum()), threshold=float(threshold),
        tpr=hits / len(member), fpr=false_alarms / len(nonmember), tpr_low=tpr_low, fpr_high=fpr_high,
        epsilon_lower=epsilon_lower, epsilon_upper=epsilon_upper, delta=delta, confidence=confidence,
        auc=auc(scores[inserted], scores[~inserted]))


def _halves(random_half: Tensor, inserted: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold-choosing and evaluation masks, each holding inserted and held-out canaries."""
    for side in (inserted, ~inserted):
        members = side.nonzero().squeeze(1)
        if random_half[members].all() or not random_half[members].any():  # tiny sets: alternate
            random_half[members] = torch.arange(len(members)) % 2 == 0
    return random_half, ~random_half
