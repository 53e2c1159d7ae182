"""LiRA, the likelihood-ratio attack (Carlini et al. 2022, "Membership Inference Attacks From First
Principles").

Reference models are trained by the target's recipe on random halves of a reference pool, so every
pool example is "in" for half of them and "out" for the rest. For each target example LiRA fits a
Gaussian to the logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of the reference models that
saw it (IN) and of those that did not (OUT), then scores the target model's phi:

- online: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``, the likelihood ratio;
- offline: a one-sided test against OUT alone, ranked by ``P[Z <= phi]`` for ``Z ~ N(mu_out, s_out)``
  and scored as ``-log(-log P)``, which ranks the same but stays distinct where ``log P`` rounds
  to 0 (from about 14 OUT stds above mu_out in float32, 38 in float64).

With few reference models per-example variances are noisy; the paper uses one global variance then.
Here that is each side's spread of the reference values around their own example's mean, pooled over
the examples; a side with one value per example (IN with 3 models) takes the other side's, and with
one value on both sides (2 models) each side's spread across examples stands in.

Augmented queries (``LiraQueries``): the paper's strongest attack queries every model on several views
of an image, the image and its mirror, each shifted by a few pixels, as models trained with flips and
crops saw them. Each view gets its own IN and OUT Gaussians (per example or global, as above), and an
example's score sums the per-view scores. The default queries the example alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.config import AugmentConfig
from fortify.data.base import Split
from fortify.errors import ConfigError, DataError
from fortify.privacy._data import (
    check_labels_fit,
    check_member_sets,
    check_split,
    join,
    locate,
    logit_confidence,
    pool_groups,
    predict_logits,
)
from fortify.privacy.metrics import MembershipResult, membership_result, split_scores
from fortify.privacy.recipe import TrainRecipe

Variance = Literal["per-example", "global", "auto"]
VARIANCES: tuple[str, ...] = ("per-example", "global", "auto")
# Carlini et al. 2022 (Sec. VI) find a global variance better below about 64 reference models
AUTO_GLOBAL_BELOW = 64
_MIN_STD = 1e-6
Padding = Literal["reflect", "constant"]
PADDINGS: tuple[str, ...] = ("reflect", "constant")


@dataclass
class ReferenceModels:
    """Reference models and which pool examples each one trained on (``keep[model, example]``)."""

    models: list[nn.Module]
    pool: Split
    keep: Tensor


def half_assignment(n_models: int, n_examples: int, generator: torch.Generator) -> Tensor:
    """Which examples each model trains on, as a bool matrix ``(n_models, n_examples)``.

    With two or more models every example is "in" for exactly ``n_models // 2`` of them (Carlini et
    al.'s balanced split), so every example has IN and OUT models; one model gets a random half.
    """
    if n_models == 1:
        keep = torch.zeros(1, n_examples, dtype=torch.bool)
        keep[0, torch.randperm(n_examples, generator=generator)[: n_examples // 2]] = True
        return keep
    ranks = torch.rand(n_models, n_examples, generator=generator).argsort(dim=0).argsort(dim=0)
    return ranks < n_models // 2


def train_reference_models(pool: Split, recipe: TrainRecipe, *, n_models: int, seed: int = 0
                           ) -> ReferenceModels:
    """Train ``n_models`` models with ``recipe``, each on its half of ``pool``'s distinct inputs.

    For online LiRA the pool must hold the examples to be attacked (members and non-members of the
    target; the attacker knows the candidates, not their membership), plus any other data.
    """
    n_models = check_positive_int("n_models", n_models)
    check_split(pool, "reference pool")
    # copies of one input go in or out together: a model that trained on one copy is no OUT model
    # for the other (duplicate rows are common in tabular data and in pools that hold the members)
    groups = pool_groups(pool, "reference pool")
    n_groups = int(groups.max()) + 1
    keep = half_assignment(n_models, n_groups, torch.Generator().manual_seed(seed))[:, groups]
    # under balanced halves a model draws no input at all with a chance of about 2**-n_groups,
    # which only a tiny pool makes likely
    idle = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if idle:
        raise DataError(f"reference model(s) {idle} drew none of the pool's {n_groups} distinct inputs "
                        "to train on; use a larger reference pool")
    models = [recipe(Split(pool.x[keep[i]], pool.y[keep[i]]), seed=seed + 1 + i)
              for i in range(n_models)]
    return ReferenceModels(models, pool, keep)


# -- augmented queries -----------------------------------------------------------------------------

def mirror_image(x: Tensor) -> Tensor:
    """Each image of a batch ``(N, C, H, W)`` mirrored left to right."""
    return x.flip(-1)


def shift_image(x: Tensor, dy: int, dx: int, *, padding: Padding = "reflect", fill: float = 0.0) -> Tensor:
    """Each image moved ``dy`` pixels down and ``dx`` right (negative: up, left), same size.

    ``out[..., i, j] = x[..., i - dy, j - dx]`` wherever that pixel exists; the rows and columns it
    vacates are padded: ``"reflect"`` mirrors the image at its border, ``"constant"`` writes ``fill``.
    """
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode=padding, value=fill if padding == "constant" else None)
    h, w = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LiraQueries:
    """The views of every example that LiRA queries each model on (Carlini et al. 2022's augmented
    queries): the example, its left-right mirror with ``mirror``, and each of them moved by every
    shift ``(dy, dx)`` with ``|dy|, |dx| <= max_shift``; ``(1 + mirror) * (2 max_shift + 1)**2`` views.

    They should be the augmentations the target trained with: a model that saw flips and crops has
    learnt its examples in those views too. Shifts pad as ``shift_image`` does: ``"reflect"`` as
    Carlini et al.'s released code, or ``"constant"`` with ``fill`` as fortify's Trainer pads its
    random crops (with the box's low end, 0 for [0, 1]). The default is the example alone.
    """

    mirror: bool = False
    max_shift: int = 0
    padding: Padding = "reflect"
    fill: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.mirror, bool):
            raise ConfigError(f"LiRA queries: mirror must be True or False, got {self.mirror!r}")
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ConfigError(f"LiRA queries: max_shift must be an integer >= 0, got {self.max_shift!r}")
        if self.padding not in PADDINGS:
            raise ConfigError(f"unknown LiRA query padding {self.padding!r}; valid: {', '.join(PADDINGS)}")
        if not _is_finite_number(self.fill):
            raise ConfigError(f"LiRA queries: fill must be a finite number, got {self.fill!r}")
        if self.fill != 0.0 and self.padding != "constant":
            raise ConfigError(f"LiRA queries: fill={self.fill!r} applies only to padding='constant', "
                              f"got padding={self.padding!r}")

    @classmethod
    def like_training(cls, augment: AugmentConfig, *, fill: float = 0.0) -> LiraQueries:
        """The views that training with ``augment`` shows a model: its mirror with flips, and shifts
        up to the crop padding, padded with ``fill`` as the Trainer pads (the box's low end). Cutout
        erases a random square each time, no fixed view, so it adds none."""
        return cls(mirror=augment.flip, max_shift=augment.crop_padding, padding="constant", fill=fill)

    @property
    def count(self) -> int:
        return (1 + self.mirror) * (2 * self.max_shift + 1) ** 2

    def views(self, x: Tensor) -> Iterator[Tensor]:
        """The query views of the batch ``x``, one batch per view, made as they are consumed."""
        shifts = range(-self.max_shift, self.max_shift + 1)
        for base in (x, mirror_image(x)) if self.mirror else (x,):
            for dy in shifts:
                for dx in shifts:
                    yield shift_image(base, dy, dx, padding=self.padding, fill=self.fill)

    def check_fits(self, x: Tensor) -> None:
        """Refuse views that ``x`` cannot have: any but the example itself needs image batches."""
        if self.count == 1:
            return
        if x.dim() != 4:
            raise ConfigError(f"LiRA's mirror and shift queries need image batches (N, C, H, W), got "
                              f"inputs of shape {tuple(x.shape)}; query other data alone (LiraQueries())")
        if self.max_shift >= min(x.shape[-2:]):
            raise ConfigError(f"LiRA queries: max_shift={self.max_shift} must be smaller than the "
                              f"images' height and width {tuple(x.shape[-2:])}")

    def to_dict(self) -> dict[str, Any]:
        return {"mirror": self.mirror, "max_shift": self.max_shift, "padding": self.padding,
                "fill": self.fill, "n_queries": self.count}


SINGLE_QUERY = LiraQueries()


def check_queries_fit(queries: LiraQueries, x: Tensor) -> None:
    """Raise ConfigError unless ``queries`` is a LiraQueries whose views the inputs ``x`` can have."""
    if not isinstance(queries, LiraQueries):
        raise ConfigError(f"LiRA queries must be a LiraQueries, got {type(queries).__name__}")
    queries.check_fits(x)


def _phi(model: nn.Module, data: Split, batch_size: int) -> Tensor:
    logits = predict_logits(model, data.x, batch_size)
    y = data.y.to(logits.device)
    check_labels_fit(logits, y, "members and non-members")
    return logit_confidence(logits, y).cpu()


def _query_phi(models: Sequence[nn.Module], data: Split, queries: LiraQueries, batch_size: int) -> Tensor:
    """phi of every model on every query view of ``data``: ``(models, examples, queries)``."""
    per_view = [torch.stack([_phi(model, Split(view, data.y), batch_size) for model in models])
                for view in queries.views(data.x)]
    return torch.stack(per_view, dim=-1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-column mean of ``values`` over the rows where ``mask`` holds."""
    return (values * mask).sum(dim=0) / mask.sum(dim=0).clamp_min(1)


def _per_example_std(values: Tensor, mask: Tensor, mean: Tensor) -> Tensor:
    counts = mask.sum(dim=0)
    residual = (values - mean) * mask
    return (residual.pow(2).sum(dim=0) / (counts - 1).clamp_min(1)).sqrt().clamp_min(_MIN_STD)


def _pooled_std(values: Tensor, mask: Tensor, mean: Tensor) -> Tensor | None:
    """One std of every example's values around their own mean; None without repeated values."""
    dof = int((mask.sum(dim=0) - 1).clamp_min(0).sum())
    if dof == 0:
        return None
    return (((values - mean) * mask).pow(2).sum() / dof).sqrt().clamp_min(_MIN_STD)


def _spread_across_examples(values: Tensor, mask: Tensor) -> Tensor:
    spread = values[mask].std(correction=0) if int(mask.sum()) > 1 else torch.tensor(1.0, dtype=values.dtype)
    return spread.clamp_min(_MIN_STD)


def _side_stds(values: Tensor, sides: list[Tensor], means: list[Tensor], global_variance: bool
               ) -> list[Tensor]:
    """The std of each side (a mask of reference models per example), per example or global."""
    if not global_variance:
        return [_per_example_std(values, mask, mean) for mask, mean in zip(sides, means, strict=True)]
    pooled = [_pooled_std(values, mask, mean) for mask, mean in zip(sides, means, strict=True)]
    known = [std for std in pooled if std is not None]
    # a side with one value per example (IN with 3 models) borrows the other side's within-example
    # std: its own spread across examples measures how examples differ, a far larger quantity, and
    # the ratio would then favour targets well below OUT's mean
    return [(std if std is not None else known[0] if known else _spread_across_examples(values, mask))
            .expand(values.shape[1]) for std, mask in zip(pooled, sides, strict=True)]


def _normal_log_pdf(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return -0.5 * ((x - mean) / std).pow(2) - std.log() - 0.5 * math.log(2 * math.pi)


def lira_scores(target_phi: Tensor, reference_phi: Tensor, in_mask: Tensor, *, online: bool,
                global_variance: bool) -> Tensor:
    """LiRA score per example from phi under the target and reference models (rows: models).

    phi holds one value per example, ``target_phi (examples,)`` and ``reference_phi (models,
    examples)``, or one per query view of it, with a last axis of queries on both. Each query is
    scored alone, its Gaussians and (global) variance its own, and an example's score is the sum
    over its queries. Carlini et al. model an example's query scores as one multivariate Gaussian;
    their released code fits it with a diagonal covariance (one Gaussian per query), as here: tens of
    reference models cannot estimate a full covariance per example, and with a diagonal one the
    log-likelihood ratio is exactly this sum (their code averages, which ranks examples the same).
    Offline, the sum ``L`` is the log of the chance that every query of an OUT model falls at or
    below the target's, the one-sided test of each query taken as independent; the score is
    ``-log(-L)``, the same ranking, with no ties where ``L`` rounds to 0. Scores are float64.
    """
    target_phi, reference_phi = target_phi.double(), reference_phi.double()
    if target_phi.dim() == 1:
        target_phi, reference_phi = target_phi[:, None], reference_phi[..., None]
    per_query = torch.stack([_one_query_scores(target_phi[:, q], reference_phi[..., q], in_mask,
                                               online=online, global_variance=global_variance)
                             for q in range(target_phi.shape[1])])
    if online:
        return per_query.sum(dim=0)
    # per_query holds log(-log P) of each query: -log(-sum of log P) = -logsumexp
    return -torch.logsumexp(per_query, dim=0)


def _one_query_scores(target_phi: Tensor, reference_phi: Tensor, in_mask: Tensor, *, online: bool,
                      global_variance: bool) -> Tensor:
    """Online: the log-likelihood ratio; offline: ``log(-log P[Z <= phi])`` under OUT."""
    sides = [~in_mask, in_mask] if online else [~in_mask]
    means = [_masked_mean(reference_phi, mask) for mask in sides]
    stds = _side_stds(reference_phi, sides, means, global_variance)
    if not online:
        return log_neg_log_ndtr((target_phi - means[0]) / stds[0])
    return _normal_log_pdf(target_phi, means[1], stds[1]) - _normal_log_pdf(target_phi, means[0], stds[0])


def log_neg_log_ndtr(z: Tensor) -> Tensor:
    """``log(-log Phi(z))`` for the standard normal CDF Phi, finite at every finite z.

    Far above the mean ``log Phi(z) = log1p(-Q)`` with ``Q = Phi(-z)`` rounds to 0, but its log
    does not: ``-log1p(-Q) = Q (1 + Q/2 + Q^2/3 + ...)``, so ``log(-log Phi)`` is
    ``log Q + log1p(Q/2 + Q^2/3)`` within ``Q^3/4``, below 1e-20 once z > 5 (Q < 3e-7).
    """
    log_q = torch.special.log_ndtr(-z)
    q = log_q.exp()
    far_above = log_q + torch.log1p(q / 2 + q * q / 3)
    return torch.where(z > 5, far_above, torch.log(-torch.special.log_ndtr(z.clamp_max(5))))


def _use_global_variance(variance: str, n_models: int) -> bool:
    if variance not in VARIANCES:
        raise ConfigError(f"unknown LiRA variance {variance!r}; valid: {', '.join(VARIANCES)}")
    return variance == "global" or (variance == "auto" and n_models < AUTO_GLOBAL_BELOW)


def _in_mask(references: ReferenceModels, candidates: Split, online: bool) -> Tensor:
    """``in_mask[model, candidate]``: the reference model trained on that candidate's input.

    Halves are drawn by input, so a model that trained on the input under another label is no OUT
    model for it (offline, it would pull the OUT fit towards the member side); online it is no IN
    model either, so online LiRA refuses such candidates.
    """
    where = locate(references.pool, candidates, by_input=True)
    missing = int((where < 0).sum())
    if online and missing:
        raise DataError(f"online LiRA needs IN reference models for every example, but {missing} "
                        f"of the {len(candidates)} members and non-members are not in the "
                        "reference pool; train the reference models on a pool that holds them")
    relabelled = int(((where >= 0) & (locate(references.pool, candidates) < 0)).sum())
    if online and relabelled:
        raise DataError(f"online LiRA needs IN reference models for every example, but {relabelled} "
                        f"of the {len(candidates)} members and non-members are in the reference pool "
                        "under another label only; give them their pool labels, or run LiRA offline")
    mask = torch.zeros(len(references.models), len(candidates), dtype=torch.bool)
    found = where >= 0
    mask[:, found] = references.keep[:, where[found]]
    return mask


def _check_counts(in_mask: Tensor, online: bool, global_variance: bool) -> None:
    need = 1 if global_variance else 2
    sides = [("OUT", (~in_mask).sum(dim=0))] + ([("IN", in_mask.sum(dim=0))] if online else [])
    for side, counts in sides:
        fewest = int(counts.min())
        if fewest < need:
            advice = "train more reference models" + (" or use variance='global'" if need == 2 else "")
            raise DataError(f"some example has {fewest} {side} reference models; "
                            f"{'per-example' if need == 2 else 'global'} variance needs at least "
                            f"{need}: {advice}")


def lira_member_scores(model: nn.Module, candidates: Split, references: ReferenceModels, *,
                       online: bool = True, variance: Variance = "auto",
                       queries: LiraQueries = SINGLE_QUERY, batch_size: int = 512) -> Tensor:
    """LiRA's score (higher = member) for each candidate; the candidates' membership is unknown.

    ``queries`` names the views of each candidate that the target and every reference model are
    queried on (images only, beyond the default of the candidate alone). Scores of several target
    models can be pooled into one ROC, as Carlini et al. do to resolve low FPRs with little data.
    """
    n_models = len(references.models)
    if n_models < 1:
        raise ConfigError("LiRA needs at least 1 reference model, got 0")
    if online and n_models < 2:
        raise ConfigError(f"online LiRA needs at least 2 reference models (each example needs one "
                          f"that trained on it and one that did not); got {n_models}")
    global_variance = _use_global_variance(variance, n_models)
    check_split(candidates, "candidates")
    check_queries_fit(queries, candidates.x)
    in_mask = _in_mask(references, candidates, online)
    _check_counts(in_mask, online, global_variance)
    phi = _query_phi([model, *references.models], candidates, queries, batch_size)
    unusable = torch.isnan(phi[1:]).any(dim=-1).nonzero()
    if unusable.numel():  # a Gaussian fit through a NaN is no fit: name the model and the example
        reference, example = unusable[0].tolist()
        raise DataError(f"reference model {reference} returns NaN logits for candidate {example} "
                        f"({len(unusable)} (model, candidate) pairs in all); LiRA fits each candidate's "
                        "scores across the reference models and cannot use them")
    # a target row with a NaN logit predicts no class (fortify.models.predictions): the least
    # member-like score, as the threshold attacks give it
    no_class = torch.isnan(phi[0]).any(dim=-1)
    scores = lira_scores(torch.where(torch.isnan(phi[0]), 0.0, phi[0]), phi[1:], in_mask, online=online,
                         global_variance=global_variance)
    return torch.where(no_class, -math.inf, scores)


def lira_attack(model: nn.Module, members: Split, non_members: Split, references: ReferenceModels,
                *, online: bool = True, variance: Variance = "auto",
                queries: LiraQueries = SINGLE_QUERY, fprs: Sequence[float] | None = None,
                batch_size: int = 512) -> MembershipResult:
    """Carlini et al. 2022's LiRA against ``model`` with already trained ``references``, querying
    each model on the ``queries`` views of every member and non-member."""
    n_models = len(references.models)
    check_member_sets(members, non_members)
    start = time.perf_counter()
    candidates, is_member = join(members, non_members)
    scores = lira_member_scores(model, candidates, references, online=online, variance=variance,
                                queries=queries, batch_size=batch_size)
    inside, outside = split_scores(scores, is_member)
    settings = {"online": online, "n_reference_models": n_models,
                "variance": "global" if _use_global_variance(variance, n_models) else "per-example",
                "reference_pool": len(references.pool), "queries": queries.to_dict()}
    return membership_result(f"lira-{'online' if online else 'offline'}", inside, outside,
                             settings=settings, fprs=fprs, seconds=time.perf_counter() - start)
