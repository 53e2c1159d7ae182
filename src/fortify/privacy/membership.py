"""Membership inference from a model's outputs: threshold attacks and the shadow-model attack.

Threshold attacks score each example by one statistic of the model's output on it: the loss (Yeom et
al. 2018, "Privacy Risk in Machine Learning"), the confidence in the true class, or the modified
entropy (Song & Mittal 2021, "Systematic Evaluation of Privacy Risks of Machine Learning Models").
The ROC over all thresholds is reported, so no threshold has to be calibrated.

The shadow-model attack (Shokri et al. 2017, "Membership Inference Attacks Against Machine Learning
Models") trains shadow models with the target's recipe on data the attacker owns, labels their
outputs "in" or "out", and fits one attack classifier per class on them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.data.base import Split
from fortify.data.rows import shared_rows
from fortify.errors import ConfigError, DataError
from fortify.privacy._data import (
    check_labels_fit,
    check_member_sets,
    check_split,
    join,
    logit_confidence,
    model_dtype,
    pool_groups,
    predict_logits,
)
from fortify.privacy.metrics import MembershipResult, membership_result, split_scores
from fortify.privacy.recipe import TrainerRecipe, TrainRecipe


def _log1mexp(log_p: Tensor) -> Tensor:
    """``log(1 - exp(log_p))`` for ``log_p <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)),
                       torch.log1p(-torch.exp(log_p)))


def loss_scores(logits: Tensor, y: Tensor) -> Tensor:
    """Negative cross-entropy: members tend to have lower loss (Yeom et al. 2018).

    Computed as ``-softplus(-phi)`` from the logit-scaled confidence ``phi`` (``p_y = sigmoid(phi)``):
    ``cross_entropy`` rounds to exactly 0 once the true logit leads by about 37, which would tie
    the most confident examples, the ones that decide the TPR at low FPR.
    """
    return -F.softplus(-logit_confidence(logits, y))


def confidence_scores(logits: Tensor, y: Tensor) -> Tensor:
    """The true class's softmax probability, given as its logit ``phi = log(p_y / (1 - p_y))``.

    ``phi`` orders examples exactly as ``p_y`` does, so the ROC is the same, but it does not round
    to 1 for confident examples (``p_y`` does in float64 once ``phi`` exceeds about 37).
    """
    return logit_confidence(logits, y)


def modified_entropy_scores(logits: Tensor, y: Tensor) -> Tensor:
    """Negative modified entropy (Song & Mittal 2021, eq. 5).

    ``Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``: low when the model is confident
    and right, high when confident and wrong, unlike plain entropy which ignores the label.
    """
    log_p = logits.double().log_softmax(dim=1)
    p = log_p.exp()
    log_1mp = _log1mexp(log_p.clamp(max=0.0))
    # only the likeliest class can hold more than half the probability; its log p loses its digits
    # near 0 and rounds to 0 once it leads by about 37 (log(1 - p) = -inf), so its log(1 - p) is
    # -softplus(phi) of its own phi: a confidently wrong example keeps a finite score that falls
    # with its margin
    top = logits.double().argmax(dim=1)
    log_1mp = log_1mp.scatter(1, top.unsqueeze(1), -F.softplus(logit_confidence(logits, top)).unsqueeze(1))
    true = F.one_hot(y.long(), logits.shape[1]).bool()
    # the true class's term from phi = log(p_y / (1 - p_y)): 1 - p_y = sigmoid(-phi) and
    # -log p_y = softplus(-phi) stay exact where p_y rounds to 1 (a margin past ~35 in float64),
    # the most confident examples, which decide the TPR at a low FPR
    phi = logit_confidence(logits, y)
    own = torch.sigmoid(-phi) * F.softplus(-phi)
    others = (-p * log_1mp).masked_fill(true, 0.0).sum(dim=1)
    return -(own + others)


STATISTICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "loss": loss_scores,
    "confidence": confidence_scores,
    "modified-entropy": modified_entropy_scores,
}


def _statistic(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in STATISTICS:
        raise ConfigError(f"unknown membership statistic {name!r}; valid: {', '.join(STATISTICS)}")
    return STATISTICS[name]


def membership_scores(model: nn.Module, data: Split, *, statistic: str = "loss",
                      batch_size: int = 512) -> Tensor:
    """Per-example score (higher = more likely a member) of ``statistic`` on ``model``'s outputs."""
    score = _statistic(statistic)
    check_split(data, "data")
    logits = predict_logits(model, data.x, batch_size)
    y = data.y.to(logits.device)
    check_labels_fit(logits, y, "data")
    # a row of logits with a NaN predicts no class (fortify.models.predictions): it is scored as the
    # least member-like of all, as the label-only attacks score a misclassified example; any other
    # NaN score (from +inf logits) is left for the metrics to refuse
    no_class = torch.isnan(logits).any(dim=1)
    return torch.where(no_class, -math.inf, score(logits, y)).cpu()


def threshold_attack(model: nn.Module, members: Split, non_members: Split, *,
                     statistic: str = "loss", fprs: Sequence[float] | None = None,
                     batch_size: int = 512) -> MembershipResult:
    """Threshold attack on one statistic: ROC, AUC, advantage and TPR at low FPR."""
    _statistic(statistic)
    check_member_sets(members, non_members)
    start = time.perf_counter()
    candidates, is_member = join(members, non_members)
    scores = membership_scores(model, candidates, statistic=statistic, batch_size=batch_size)
    inside, outside = split_scores(scores, is_member)
    return membership_result(f"threshold-{statistic}", inside, outside,
                             settings={"statistic": statistic}, fprs=fprs,
                             seconds=time.perf_counter() - start)


# -- Shokri et al. 2017 ----------------------------------------------------------------------------

# a factory of sklearn-style estimators: fit, and decision_function or predict_proba
AttackClassifier = Callable[[], object]


def default_attack_classifier() -> object:
    """Standardised logistic regression: enough for per-class attack models (Shokri et al. 2017)."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def attack_features(logits: Tensor) -> np.ndarray:
    """The prediction vector as log-probabilities (a monotone, better-scaled view of softmax)."""
    return logits.double().log_softmax(dim=1).clamp(min=-50.0).cpu().numpy()


def _shadow_data(pool: Split, groups: Tensor, recipe: TrainRecipe, n_shadows: int, seed: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, classes and in/out labels of the pool under each shadow model."""
    generator = torch.Generator().manual_seed(seed)
    # halves of the distinct inputs (``groups``), so that copies of one input land on the same side (a
    # copy labelled "out" would be one the shadow model trained on); without copies, halves of the rows
    n_groups = int(groups.max()) + 1
    features, classes, labels = [], [], []
    for index in range(n_shadows):
        chosen = torch.zeros(n_groups, dtype=torch.bool)
        chosen[torch.randperm(n_groups, generator=generator)[: n_groups // 2]] = True
        inside = chosen[groups]
        shadow = recipe(Split(pool.x[inside], pool.y[inside]), seed=seed + 1 + index)
        features.append(attack_features(predict_logits(shadow, pool.x, batch_size)))
        classes.append(pool.y.cpu().numpy())
        labels.append(inside.numpy().astype(np.int64))
    return np.concatenate(features), np.concatenate(classes), np.concatenate(labels)


def _fit_or_none(factory: AttackClassifier, features: np.ndarray, labels: np.ndarray) -> object | None:
    if np.unique(labels).size < 2:
        return None  # all in or all out: nothing to separate
    model = factory()
    model.fit(features, labels)  # type: ignore[attr-defined]
    return model


def _fit_attack_models(features: np.ndarray, classes: np.ndarray, labels: np.ndarray,
                       factory: AttackClassifier) -> tuple[dict[int, object], object]:
    """One attack classifier per class, and a pooled one for classes with too little shadow data."""
    pooled = _fit_or_none(factory, features, labels)
    if pooled is None:
        raise DataError("the shadow models' data holds only one membership label; the shadow pool "
                        "needs at least 2 examples")
    per_class: dict[int, object] = {}
    for cls in np.unique(classes):
        chosen = classes == cls
        fitted = _fit_or_none(factory, features[chosen], labels[chosen])
        if fitted is not None:
            per_class[int(cls)] = fitted
    return per_class, pooled


def _member_scores(per_class: dict[int, object], pooled: object, features: np.ndarray,
                   classes: np.ndarray) -> np.ndarray:
    scores = np.empty(len(classes))
    for cls in np.unique(classes):
        chosen = classes == cls
        scores[chosen] = _membership_log_odds(per_class.get(int(cls), pooled), features[chosen])
    return scores


def _membership_log_odds(model: Any, features: np.ndarray) -> np.ndarray:
    """The attack classifier's score for "member": its decision function (the log-odds, for logistic
    regression) where it has one. Its probabilities round to exactly 0 or 1 for confident rows, which
    would tie them and blur the ROC's low-FPR end; the log-odds rank the same rows without ties."""
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(features), dtype=np.float64)
    return np.asarray(model.predict_proba(features)[:, 1], dtype=np.float64)


def shadow_attack(model: nn.Module, members: Split, non_members: Split, *, shadow_pool: Split,
                  recipe: TrainRecipe | None = None, n_shadows: int = 4,
                  attack_classifier: AttackClassifier = default_attack_classifier, seed: int = 0,
                  fprs: Sequence[float] | None = None, batch_size: int = 512) -> MembershipResult:
    """Shokri et al. 2017: shadow models trained by ``recipe`` on random halves of ``shadow_pool``
    (halves of its distinct inputs: copies of one input fall on the same side).

    ``shadow_pool`` is data from the target's distribution that the attacker owns; it should not
    overlap the target's members and non-members (inputs found in both are counted in
    ``settings["shadow_pool_overlap"]`` and named in a note). Each shadow model's outputs on its half are
    labelled "in", on the other half "out"; one attack classifier per true class learns to tell them
    apart and then scores the target model's outputs on the members and non-members (by its
    decision function, the log-odds of "member" for the default logistic regression, so that
    confident rows do not tie at a probability of exactly 1). Without a
    ``recipe`` the shadow models are re-initialised copies of ``model`` trained by the Trainer with
    the default standard TrainConfig (``TrainerRecipe.like``).
    """
    n_shadows = check_positive_int("n_shadows", n_shadows)
    check_member_sets(members, non_members)
    check_split(shadow_pool, "shadow pool")
    # shadow models are the target's kind: they train on the pool in the target's dtype, as every
    # prediction here reads inputs (float64 data from numpy, a float32 model)
    training_pool = Split(shadow_pool.x.to(model_dtype(model, shadow_pool.x.dtype)), shadow_pool.y)
    groups = pool_groups(training_pool, "shadow pool")
    start = time.perf_counter()
    recipe = recipe or TrainerRecipe.like(model)
    features, classes, labels = _shadow_data(training_pool, groups, recipe, n_shadows, seed, batch_size)
    per_class, pooled = _fit_attack_models(features, classes, labels, attack_classifier)
    candidates, is_member = join(members, non_members)
    logits = predict_logits(model, candidates.x, batch_size)
    check_labels_fit(logits, candidates.y.to(logits.device), "members and non-members")
    scores = _member_scores(per_class, pooled, attack_features(logits),
                                 candidates.y.cpu().numpy())
    inside, outside = split_scores(torch.from_numpy(scores), is_member)
    overlap = len(shared_rows(shadow_pool.x, candidates.x))
    settings = {"n_shadows": n_shadows, "shadow_pool": len(shadow_pool), "seed": seed,
                "classes_with_own_attack_model": sorted(per_class), "shadow_pool_overlap": overlap}
    result = membership_result("shadow-models", inside, outside, settings=settings, fprs=fprs,
                               seconds=time.perf_counter() - start)
    if overlap:
        # the attacker's own data is meant to be disjoint from the target's (Shokri et al. 2017); shared
        # inputs let the attack classifiers learn the very examples they then score
        result.notes.append(f"{overlap} of the shadow pool's {len(shadow_pool)} inputs are also among the "
                            "members or non-members scored; the shadow attack assumes attacker data "
                            "disjoint from them")
    return result
