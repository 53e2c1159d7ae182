"""Robustness metrics as pure functions on tensors, each returning a dataclass with ``to_dict()``.

docs/METRICS.md gives every definition with its formula, its meaning and what it is a bound of.
Conventions: ``y`` holds the true labels, ``clean_logits = model(x)``, ``adv_logits = model(x_adv)``;
an example counts as robust only when it is classified correctly both clean and under attack.
Distances are measured in the threat model's norm.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import Tensor

from fortify.attacks.adaptive import logit_margin
from fortify.attacks.base import as_class_indices, check_label_range
from fortify.errors import ConfigError, DataError, ThreatModelViolation
from fortify.models.predictions import NO_CLASS, predicted_class
from fortify.threat import ThreatModel, check_in_box


def json_safe(value: Any) -> Any:
    """Non-finite floats become None so that ``json.dumps`` writes standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))  # type: ignore[call-overload]


def _checked_labels(logits: Tensor, y: Tensor) -> Tensor:
    """``y`` as int64 class indices, once it is known to fit ``logits`` (N, K)."""
    if logits.dim() != 2 or y.dim() != 1 or logits.shape[0] != y.shape[0]:
        raise DataError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and "
                        f"{tuple(y.shape)}")
    if y.numel() == 0:
        raise DataError("metrics need at least one example, got an empty batch")
    y = as_class_indices(y)
    check_label_range(y, logits.shape[1])
    return y


def _checked_pair(clean_logits: Tensor, adv_logits: Tensor, y: Tensor) -> Tensor:
    """Labels checked against clean and adversarial logits, which must score the same classes."""
    if clean_logits.shape != adv_logits.shape:
        raise DataError(f"clean and adversarial logits must have the same shape (N, K), got "
                        f"{tuple(clean_logits.shape)} and {tuple(adv_logits.shape)}")
    _checked_labels(adv_logits, y)
    return _checked_labels(clean_logits, y)


def _mean(t: Tensor) -> float | None:
    return float(t.float().mean()) if t.numel() else None


def median(t: Tensor) -> float | None:
    """The median, between the two middle values for an even count (numpy's convention, as the
    distance quartiles); None for an empty tensor."""
    return _quantile(t.detach().flatten().double(), 0.5) if t.numel() else None


# -- accuracy, success rate, perturbation size ---------------------------------------------------

def accuracy(logits: Tensor, y: Tensor) -> float:
    """Share of examples whose top-1 prediction is the label."""
    y = _checked_labels(logits, y)
    return float((predicted_class(logits) == y).float().mean())


@dataclass
class AttackMetrics(_Serializable):
    n_examples: int
    n_clean_correct: int
    n_successful: int
    clean_accuracy: float
    adversarial_accuracy: float
    success_rate: float | None  # over clean-correct examples; None when there are none
    mean_norm_successful: float | None  # over successful examples; None when there are none
    median_norm_successful: float | None
    norm: str


def attack_metrics(x: Tensor, x_adv: Tensor, y: Tensor, clean_logits: Tensor, adv_logits: Tensor,
                   threat: ThreatModel) -> AttackMetrics:
    """Clean and adversarial accuracy, success rate, and the size of the successful perturbations."""
    y = _checked_pair(clean_logits, adv_logits, y)
    if x.shape != x_adv.shape or x.shape[0] != y.shape[0]:
        raise DataError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} must match, with one "
                        f"label per example ({y.shape[0]})")
    check_in_box(x, threat.bounds)  # a clean input outside the box is the data's fault, not the attack's
    outside = ~threat.contains(x_adv, x)
    if bool(outside.any()):  # a point outside the threat model is no success of an attack within it
        raise ThreatModelViolation(f"{int(outside.sum())} of the adversarial points lie outside "
                                   f"{threat.describe()}")
    clean_correct = predicted_class(clean_logits) == y
    successful = clean_correct & (predicted_class(adv_logits) != y)
    norms = threat.distance(x_adv, x)[successful]
    n_correct = int(clean_correct.sum())
    return AttackMetrics(
        n_examples=len(y), n_clean_correct=n_correct, n_successful=int(successful.sum()),
        clean_accuracy=float(clean_correct.float().mean()),
        adversarial_accuracy=float((clean_correct & ~successful).float().mean()),
        success_rate=float(successful.sum()) / n_correct if n_correct else None,
        mean_norm_successful=_mean(norms), median_norm_successful=median(norms), norm=threat.norm)


# -- one-number summaries --------------------------------------------------------------------------

def harmonic_robustness(clean_accuracy: float, worst_case_accuracy: float) -> float:
    """``2 c w / (c + w)``: high only when both clean and worst-case accuracy are high."""
    for name, value in (("clean_accuracy", clean_accuracy), ("worst_case_accuracy", worst_case_accuracy)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{name} must lie in [0, 1], got {value!r}")
    if worst_case_accuracy > clean_accuracy:  # every attack starts from the clean-correct examples
        raise DataError(f"worst-case accuracy {worst_case_accuracy!r} exceeds clean accuracy "
                        f"{clean_accuracy!r}")
    total = clean_accuracy + worst_case_accuracy
    return 0.0 if total == 0 else 2 * clean_accuracy * worst_case_accuracy / total


def eps_curve_auc(eps: Sequence[float], accuracy: Sequence[float], clean_accuracy: float,
                  eps_max: float | None = None) -> float:
    """Normalised area under accuracy(eps) on ``[0, eps_max]``, the clean point at eps = 0 included.

    Trapezoids between the measured points, divided by ``eps_max`` (default: the largest eps), so
    the result is the mean accuracy over the interval and lies in [0, 1].
    """
    points = _curve_points(eps, accuracy, clean_accuracy)
    largest = points[-1][0]
    eps_max = largest if eps_max is None else float(eps_max)
    if not 0 < eps_max <= largest:
        raise ConfigError(f"eps_max must be in (0, {largest:g}] (the largest measured eps), got {eps_max!r}")
    area = 0.0
    for (e0, a0), (e1, a1) in zip(points, points[1:], strict=False):
        if e0 >= eps_max:
            break
        if e1 > eps_max:  # cut the last trapezoid at eps_max by linear interpolation
            a1 = a0 + (a1 - a0) * (eps_max - e0) / (e1 - e0)
            e1 = eps_max
        area += (e1 - e0) * (a0 + a1) / 2
    return area / eps_max


def _curve_points(eps: Sequence[float], accuracy: Sequence[float],
                  clean_accuracy: float) -> list[tuple[float, float]]:
    eps, accuracy = [float(e) for e in eps], [float(a) for a in accuracy]
    if len(eps) != len(accuracy) or not eps:
        raise DataError(f"need one accuracy per eps and at least one eps, got {len(eps)} eps and "
                        f"{len(accuracy)} accuracies")
    if any(not (math.isfinite(e) and e > 0) for e in eps) or len(set(eps)) != len(eps):
        raise DataError(f"eps values must be distinct finite numbers > 0, got {eps}")
    if any(not 0 <= a <= 1 for a in [*accuracy, clean_accuracy]):
        raise DataError(f"accuracies must lie in [0, 1], got clean {clean_accuracy} and {accuracy}")
    if any(a > clean_accuracy for a in accuracy):
        raise DataError(f"accuracy under attack cannot exceed clean accuracy {clean_accuracy}, "
                        f"got {accuracy}")
    return [(0.0, float(clean_accuracy)), *sorted(zip(eps, accuracy, strict=True))]


@dataclass
class RobustnessScore(_Serializable):
    clean_accuracy: float
    worst_case_accuracy: float
    harmonic_mean: float
    eps_auc: float | None
    eps_max: float | None


def robustness_score(clean_accuracy: float, worst_case_accuracy: float, *,
                     eps: Sequence[float] | None = None, eps_accuracy: Sequence[float] | None = None,
                     eps_max: float | None = None) -> RobustnessScore:
    """The harmonic mean and, when an eps curve is given, its normalised area."""
    auc = None
    no_curve = eps is None or not len(eps)
    if no_curve and ((eps_accuracy is not None and len(eps_accuracy)) or eps_max is not None):
        # an accuracy curve or a cut without the eps it belongs to would be dropped without a word
        raise DataError(f"eps_accuracy and eps_max need the eps curve's eps, got eps={eps}")
    if eps is not None and len(eps):
        if eps_accuracy is None:
            raise DataError("eps was given without eps_accuracy (one accuracy per eps)")
        auc = eps_curve_auc(eps, eps_accuracy, clean_accuracy, eps_max)
        eps_max = float(max(eps)) if eps_max is None else float(eps_max)
    return RobustnessScore(clean_accuracy=clean_accuracy, worst_case_accuracy=worst_case_accuracy,
                           harmonic_mean=harmonic_robustness(clean_accuracy, worst_case_accuracy),
                           eps_auc=auc, eps_max=eps_max if auc is not None else None)


# -- minimal adversarial distances -----------------------------------------------------------------

def minimal_distances_from_sweep(eps: Sequence[float], fooled: Tensor,
                                 clean_correct: Tensor | None = None) -> Tensor:
    """Per example, the smallest eps of a sweep at which the attack fooled it (inf: never).

    ``fooled`` is (len(eps), N) booleans. The result is an upper bound, to the grid's resolution, on
    each example's distance to the decision boundary. With ``clean_correct`` (N booleans) an example
    misclassified clean gets its exact distance, 0, instead of the grid's smallest eps.
    """
    if len(eps) == 0:
        raise DataError("minimal_distances_from_sweep needs at least one eps")
    grid = torch.tensor([float(e) for e in eps], dtype=torch.float64, device=fooled.device)
    if not bool(torch.isfinite(grid).all()) or bool((grid < 0).any()):
        raise DataError(f"eps of a sweep must be finite numbers >= 0, got {list(eps)}")
    if fooled.dim() != 2 or fooled.shape[0] != len(grid):
        raise DataError(f"fooled must have shape ({len(grid)}, N), got {tuple(fooled.shape)}")
    per_eps = torch.where(fooled.bool(), grid.unsqueeze(1), torch.full_like(grid, math.inf).unsqueeze(1))
    distances = per_eps.amin(dim=0)
    if clean_correct is None:
        return distances
    if clean_correct.shape != distances.shape:
        raise DataError(f"clean_correct must have shape {tuple(distances.shape)}, "
                        f"got {tuple(clean_correct.shape)}")
    return torch.where(clean_correct.bool(), distances, torch.zeros_like(distances))


@dataclass
class DistanceSummary(_Serializable):
    n_examples: int
    n_not_found: int  # examples with no adversarial point found (distance inf)
    q1: float
    median: float
    q3: float
    eps: list[float]
    fraction_below: list[float]  # share of examples with distance <= eps, per eps


def distance_summary(distances: Tensor, eps: Sequence[float]) -> DistanceSummary:
    """Quartiles of per-example minimal adversarial distances and the share within each eps.

    ``distances`` are 0 for examples misclassified clean and inf where no adversarial point was
    found; quartiles may then be inf (written as null in JSON).
    """
    d = distances.detach().flatten()
    d = d.to(torch.promote_types(d.dtype, torch.float32))
    if d.numel() == 0 or bool(torch.isnan(d).any()) or bool((d < 0).any()):
        raise DataError("distances must be a non-empty tensor of numbers >= 0 (inf allowed, no NaN)")
    if any(not (math.isfinite(float(e)) and float(e) > 0) for e in eps):
        raise DataError(f"eps values must be finite numbers > 0, got {list(eps)}")
    q1, median, q3 = (_quantile(d.double(), q) for q in (0.25, 0.5, 0.75))
    # eps is rounded to the distances' dtype, so that a distance measured as exactly eps counts
    within = [(d <= torch.tensor(float(e), dtype=d.dtype)).double().mean() for e in eps]
    return DistanceSummary(n_examples=d.numel(), n_not_found=int(torch.isinf(d).sum()), q1=q1,
                           median=median, q3=q3, eps=[float(e) for e in eps],
                           fraction_below=[float(w) for w in within])


def _quantile(sorted_or_not: Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) that tolerates inf values: between an
    infinite and a finite value it lies at the infinite one (numpy's arithmetic gives NaN there)."""
    values = sorted_or_not.sort().values
    position = q * (len(values) - 1)
    low, high = math.floor(position), math.ceil(position)
    lower, upper = float(values[low]), float(values[high])
    if low == high or lower == upper:
        return lower
    if math.isinf(lower) and math.isinf(upper):  # -inf and inf: no value between them
        return math.nan
    if math.isinf(lower) or math.isinf(upper):
        return lower if math.isinf(lower) else upper
    return lower + (upper - lower) * (position - low)


# -- confidence under attack ----------------------------------------------------------------------

def normalized_entropy(logits: Tensor) -> Tensor:
    """Per example ``H(softmax(z)) / log K`` in [0, 1]: 0 for a one-hot, 1 for uniform.

    A row with ``+inf`` logits puts its probability evenly on them, and a row of ``-inf`` throughout
    evenly on all (softmax would give NaN); a row
    with a NaN predicts no class (``fortify.models.predictions``) and counts as fully uncertain, 1.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise DataError(f"expected logits (N, K) with K >= 2, got {tuple(logits.shape)}")
    z = logits.double()
    # the largest logits share the probability evenly when they are infinite: every +inf of a row,
    # or every entry of a row that is -inf throughout (where softmax would give NaN)
    top = torch.isposinf(z) | torch.isneginf(z).all(dim=1, keepdim=True)
    p = torch.where(top.any(dim=1, keepdim=True), top.double() / top.sum(dim=1, keepdim=True).clamp_min(1),
                    torch.softmax(z, dim=1))
    entropy = torch.special.entr(p).sum(dim=1) / math.log(logits.shape[1])  # entr(0) = 0
    return torch.where(torch.isnan(z).any(dim=1), 1.0, entropy)


@dataclass
class Shift(_Serializable):
    metric: str
    clean_mean: float
    adversarial_mean: float
    shift: float  # adversarial_mean - clean_mean
    clean_median: float
    adversarial_median: float


def _shift(metric: str, clean: Tensor, adversarial: Tensor) -> Shift:
    clean_mean, adv_mean = float(clean.mean()), float(adversarial.mean())
    return Shift(metric=metric, clean_mean=clean_mean, adversarial_mean=adv_mean,
                 shift=adv_mean - clean_mean, clean_median=_quantile(clean.double(), 0.5),
                 adversarial_median=_quantile(adversarial.double(), 0.5))


def entropy_shift(clean_logits: Tensor, adv_logits: Tensor) -> Shift:
    """Mean normalised predictive entropy, clean and under attack, over all examples."""
    if clean_logits.shape != adv_logits.shape or clean_logits.numel() == 0:
        raise DataError(f"clean and adversarial logits must be the same non-empty shape (one row per "
                        f"example), got {tuple(clean_logits.shape)} and {tuple(adv_logits.shape)}")
    return _shift("normalized_entropy", normalized_entropy(clean_logits), normalized_entropy(adv_logits))


def margin_shift(clean_logits: Tensor, adv_logits: Tensor, y: Tensor) -> Shift:
    """Mean logit margin ``z_y - max_{j != y} z_j``, clean and under attack, over all examples."""
    y = _checked_pair(clean_logits, adv_logits, y)
    if clean_logits.shape[1] < 2:  # no other class to hold a margin against
        raise DataError(f"expected logits (N, K) with K >= 2, got {tuple(clean_logits.shape)}")
    return _shift("logit_margin", _margin_or_minus_inf(clean_logits, y), _margin_or_minus_inf(adv_logits, y))


def _margin_or_minus_inf(logits: Tensor, y: Tensor) -> Tensor:
    """The logit margin; -inf for a row with a NaN, which predicts no class and is never correct.
    A tie is 0, also between infinite logits (where ``inf - inf`` would be NaN)."""
    z = logits.double()
    own = z.gather(1, y.unsqueeze(1)).squeeze(1)
    best_other = z.scatter(1, y.unsqueeze(1), -torch.inf).amax(dim=1)
    margin = torch.where(own == best_other, 0.0, logit_margin(z, y))
    return torch.where(torch.isnan(logits).any(dim=1), -math.inf, margin)


# -- per-class quality ----------------------------------------------------------------------------

@dataclass
class ClassReport(_Serializable):
    labels: list[int]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class


def class_report(predictions: Tensor, y: Tensor, num_classes: int) -> ClassReport:
    """Per-class and macro precision, recall and F1 and the confusion matrix (0 where undefined).

    The macro averages run over the classes that occur among the labels or the predictions: a class
    absent from both (a small or capped test set) has nothing to score, and counting it as 0 would
    read as an error the model never made. A prediction of ``NO_CLASS`` (NaN logits) misses its
    label's recall and lands in no class's precision or column of the confusion matrix.
    """
    if predictions.shape != y.shape or y.dim() != 1 or y.numel() == 0:
        raise DataError(f"predictions {tuple(predictions.shape)} and labels {tuple(y.shape)} must be "
                        "equal non-empty 1-D shapes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    y = as_class_indices(y)
    check_label_range(y, num_classes)
    check_label_range(predictions[predictions != NO_CLASS], num_classes, what="predictions")
    labels = list(range(num_classes))
    truth, pred = y.cpu().numpy(), predictions.cpu().numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, pred, labels=labels, average=None, zero_division=0)
    present = sorted(set(truth.tolist()) | set(pred.tolist()) - {NO_CLASS})
    macro = precision_recall_fscore_support(truth, pred, labels=present, average="macro", zero_division=0)
    return ClassReport(labels=labels, precision=precision.tolist(), recall=recall.tolist(),
                       f1=f1.tolist(), support=[int(s) for s in support],
                       macro_precision=float(macro[0]), macro_recall=float(macro[1]),
                       macro_f1=float(macro[2]),
                       confusion=confusion_matrix(truth, pred, labels=labels).tolist())


@dataclass
class ClassReports(_Serializable):
    clean: ClassReport
    adversarial: ClassReport


def class_reports(clean_logits: Tensor, adv_logits: Tensor, y: Tensor,
                  num_classes: int | None = None) -> ClassReports:
    """Class reports of the clean predictions and of the predictions on the adversarial inputs."""
    y = _checked_pair(clean_logits, adv_logits, y)
    if num_classes is not None and num_classes != clean_logits.shape[1]:
        raise DataError(f"num_classes={num_classes} but the logits score {clean_logits.shape[1]} classes")
    num_classes = clean_logits.shape[1]
    return ClassReports(clean=class_report(predicted_class(clean_logits), y, num_classes),
                        adversarial=class_report(predicted_class(adv_logits), y, num_classes))


# -- everything about one attack ------------------------------------------------------------------

@dataclass
class AdversarialMetrics(_Serializable):
    attack: AttackMetrics
    entropy: Shift
    margin: Shift
    classes: ClassReports


def adversarial_metrics(x: Tensor, x_adv: Tensor, y: Tensor, clean_logits: Tensor, adv_logits: Tensor,
                        threat: ThreatModel, num_classes: int | None = None) -> AdversarialMetrics:
    """All the per-attack metrics of this module for one set of adversarial points."""
    return AdversarialMetrics(attack=attack_metrics(x, x_adv, y, clean_logits, adv_logits, threat),
                              entropy=entropy_shift(clean_logits, adv_logits),
                              margin=margin_shift(clean_logits, adv_logits, y),
                              classes=class_reports(clean_logits, adv_logits, y, num_classes))
