"""Membership-inference metrics: ROC curve, AUC, balanced accuracy, advantage and TPR at low FPR.

Every attack here produces one score per example, higher meaning "more likely a member". Carlini et
al. 2022 ("Membership Inference Attacks From First Principles") argue that an attack is judged by its
true-positive rate at a low false-positive rate, read from a ROC curve on log-log axes, rather than by
AUC or balanced accuracy alone, so results keep all of them and the curve itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from torch import Tensor

from fortify.errors import ConfigError, DataError

DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)


@dataclass
class RocCurve:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass
class MembershipResult:
    """One membership attack's scores summarised; ``roc_fpr``/``roc_tpr`` are the curve's corners."""

    attack: str
    settings: dict[str, Any]
    n_members: int
    n_nonmembers: int
    auc: float
    # balanced accuracy and advantage take the best threshold on the very scores they are measured
    # on, so they are optimistic: a blind attack on 1,158 members and 359 non-members shows an
    # advantage of about 0.04 on average (0.07 at the 95th percentile), not 0
    balanced_accuracy: float  # at the best single threshold
    advantage: float  # max over thresholds of TPR - FPR (Yeom et al. 2018)
    best_threshold: float
    tpr_at_fpr: dict[str, float]  # key: the FPR as written by repr(float), e.g. "0.001"
    roc_fpr: list[float] = field(repr=False, default_factory=list)
    roc_tpr: list[float] = field(repr=False, default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MembershipResult:
        return cls(**data)


# -- curve and scalar metrics ------------------------------------------------------------------

def _as_scores(scores: Tensor | np.ndarray | Sequence[float], name: str) -> np.ndarray:
    array = (scores.detach().double().cpu().numpy() if isinstance(scores, Tensor)
             else np.asarray(scores, dtype=np.float64)).reshape(-1)
    if array.size == 0:
        raise DataError(f"{name} is empty: membership metrics need at least one score on each side")
    if np.isnan(array).any():
        raise DataError(f"{name} holds {int(np.isnan(array).sum())} NaN scores")
    return array  # an infinite score is a legitimate certainty, ranked by _labelled


def _labelled(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Membership labels, each score's rank among the distinct scores, and those distinct scores.

    scikit-learn takes finite scores only. Ranks keep the order and the ties of the scores exactly, so
    +inf ranks above every finite score (and -inf below), where clipping it to the largest float
    would tie it with a score of that value.
    """
    members = _as_scores(member_scores, "member scores")
    nonmembers = _as_scores(nonmember_scores, "non-member scores")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    distinct, ranks = np.unique(np.concatenate([members, nonmembers]), return_inverse=True)
    return labels, ranks, distinct


def roc_curve(member_scores: Any, nonmember_scores: Any, *, corners_only: bool = False) -> RocCurve:
    """The ROC curve of "member if score >= threshold" over all thresholds.

    ``corners_only`` drops points on straight horizontal or vertical runs; linear interpolation
    between the remaining points gives the same curve, so plots and interpolated TPRs are unchanged.
    """
    labels, ranks, distinct = _labelled(member_scores, nonmember_scores)
    fpr, tpr, rank_thresholds = sk_roc_curve(labels, ranks, drop_intermediate=corners_only)
    # back from ranks to scores; the threshold that flags nothing stays +inf
    flags_some = np.isfinite(rank_thresholds)
    thresholds = np.full(rank_thresholds.shape, np.inf)
    thresholds[flags_some] = distinct[rank_thresholds[flags_some].astype(np.int64)]
    return RocCurve(fpr, tpr, thresholds)


def auc(member_scores: Any, nonmember_scores: Any) -> float:
    """Area under the ROC curve: the chance that a random member outscores a random non-member."""
    labels, ranks, _ = _labelled(member_scores, nonmember_scores)
    return float(roc_auc_score(labels, ranks))


def min_nonmembers_for_fpr(fpr: float) -> int:
    """Non-members needed before one false positive is a rate of at most ``fpr``."""
    return math.ceil(1.0 / _as_fpr(fpr) - 1e-9)


def _as_fpr(fpr: float) -> float:
    """A target FPR as a Python float in (0, 1).

    A numpy float is read as the decimal it prints as: ``np.float32(0.01)`` is 0.01, where its exact
    value 0.009999999776 would need 101 non-members and be reported under that long key.
    """
    if not (isinstance(fpr, numbers.Real) and 0.0 < fpr < 1.0):
        raise ConfigError(f"a target FPR must be a number in (0, 1), got {fpr!r}")
    return float(str(fpr)) if isinstance(fpr, np.floating) else float(fpr)


def tpr_at_fpr(curve: RocCurve, fpr: float, n_nonmembers: int) -> float:
    """TPR at exactly ``fpr``, interpolated linearly between the two ROC points around it.

    A point between two thresholds is reached by choosing between them at random, so the
    straight line between neighbouring ROC points is achievable; reading off the step below it
    would understate the attack. With fewer than ``1 / fpr`` non-members the curve has no point at
    or below ``fpr`` other than the origin, and the number would be an extrapolation: refused.
    """
    fpr = _as_fpr(fpr)
    needed = min_nonmembers_for_fpr(fpr)
    if n_nonmembers < needed:
        raise DataError(
            f"TPR at FPR {fpr:g} needs at least {needed} non-members (one false positive must be at "
            f"most {fpr:g} of them); got {n_nonmembers}. Add non-members or ask for a larger FPR"
        )
    below = int(np.searchsorted(curve.fpr, fpr, side="right")) - 1  # last point with FPR <= fpr
    if curve.fpr[below] == fpr or below == len(curve.fpr) - 1:
        return float(curve.tpr[below])
    above = below + 1
    weight = (fpr - curve.fpr[below]) / (curve.fpr[above] - curve.fpr[below])
    return float(curve.tpr[below] + weight * (curve.tpr[above] - curve.tpr[below]))


def resolvable_fprs(n_nonmembers: int, requested: Sequence[float] | None) -> tuple[list[float], list[str]]:
    """FPRs to report: all of ``requested`` (checked later), or the defaults the data can resolve.

    ``requested=None`` means DEFAULT_FPRS restricted to those with enough non-members; each one
    dropped gets a note saying how many non-members it would need.
    """
    if requested is not None:
        if isinstance(requested, (str, bytes)) or not isinstance(requested, Iterable):
            raise ConfigError(f"fprs must be a list of false-positive rates, got {requested!r}")
        return [_as_fpr(fpr) for fpr in requested], []
    kept, notes = [], []
    for fpr in DEFAULT_FPRS:
        needed = min_nonmembers_for_fpr(fpr)
        if n_nonmembers >= needed:
            kept.append(fpr)
        else:
            notes.append(f"TPR at FPR {fpr:g} not reported: it needs {needed} non-members, "
                         f"there are {n_nonmembers}")
    return kept, notes


# -- the summary every attack returns ------------------------------------------------------------

def membership_result(
    attack: str,
    member_scores: Tensor | np.ndarray,
    nonmember_scores: Tensor | np.ndarray,
    *,
    settings: dict[str, Any] | None = None,
    fprs: Sequence[float] | None = None,
    seconds: float = 0.0,
) -> MembershipResult:
    """Summarise per-example scores (higher = member) into a MembershipResult.

    ``fprs=None`` reports TPR at 0.1% and 1% FPR where the number of non-members resolves them;
    an explicit list is honoured or refused with a DataError saying how many non-members it needs.
    """
    member_scores = _as_scores(member_scores, "member scores")
    nonmember_scores = _as_scores(nonmember_scores, "non-member scores")
    n_members, n_nonmembers = member_scores.size, nonmember_scores.size
    targets, notes = resolvable_fprs(n_nonmembers, fprs)
    full = roc_curve(member_scores, nonmember_scores)
    tprs = {repr(f): tpr_at_fpr(full, f, n_nonmembers) for f in targets}
    gap = full.tpr - full.fpr
    best = int(np.argmax(gap))
    corners = roc_curve(member_scores, nonmember_scores, corners_only=True)
    return MembershipResult(
        attack=attack, settings=dict(settings or {}), n_members=n_members,
        n_nonmembers=n_nonmembers, auc=auc(member_scores, nonmember_scores),
        balanced_accuracy=float(0.5 * (1.0 + gap[best])), advantage=float(gap[best]),
        best_threshold=float(np.clip(full.thresholds[best], -np.finfo(np.float64).max,
                                     np.finfo(np.float64).max)),
        tpr_at_fpr=tprs, roc_fpr=corners.fpr.tolist(), roc_tpr=corners.tpr.tolist(), notes=notes,
        seconds=seconds)


def split_scores(scores: Tensor, is_member: Tensor) -> tuple[Tensor, Tensor]:
    """Scores of the members and of the non-members, as float64 tensors on the CPU."""
    scores = scores.detach().double().cpu()
    is_member = is_member.detach().cpu().bool()
    return scores[is_member], scores[~is_member]
