"""What the report shows about one model beyond its accuracy table.

``analyse`` runs, on the test examples, the measurements the metric functions define: the metrics
under one strong attack (entropy, margin, per-class quality, confusion), the robust margin from a
minimal-norm attack, the certified radius from randomized smoothing next to an L2 margin, the
gradient-masking verdict, and a small gallery of clean and adversarial images. Each part is
computed on a capped number of examples (``AnalysisOptions``) so a run stays cheap; the caps are
recorded with the results.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fortify.attacks.base import Attack, as_class_indices, check_positive_int
from fortify.attacks.fmn import FMN
from fortify.attacks.pgd import PGD
from fortify.errors import ConfigError, ThreatModelViolation
from fortify.evaluation.certify import certified_accuracy_curve, certify
from fortify.evaluation.gradients import ZeroGradientPath, input_gradient
from fortify.evaluation.masking import MaskingConfig, MaskingVerdict, NothingToJudge, masking_verdict
from fortify.evaluation.metrics import (
    adversarial_metrics,
    distance_summary,
    json_safe,
    minimal_distances_from_sweep,
    robustness_score,
)
from fortify.evaluation.robustness import RobustnessReport
from fortify.models.batching import query_batch
from fortify.models.modes import restore_modes, save_modes
from fortify.models.predictions import predicted_class
from fortify.threat import ThreatModel
from fortify.training.distributed import batch_seed

ANALYSIS_VERSION = 1
# a certificate larger than the base model's measured L2 margin by more than this is flagged
_RADIUS_SLACK = 1e-6
# the share of examples whose clean correctness may differ between the report and the model
# analysed: mixed precision (the report's evaluation under autocast) flips a few near the boundary
_REPORT_DISAGREEMENT = 0.02
# the resolution of the PGD sweep that measures margins under a feature schema: eps / 4
_SWEEP_STEPS_PER_EPS = 4


@dataclass(frozen=True)
class AnalysisOptions:
    """How many test examples each measurement uses, and the smoothing and search budgets."""

    margin_examples: int = 100
    margin_steps: int = 100
    certify_examples: int = 100
    certify_sigma: float = 0.25
    certify_n: int = 1000
    certify_alpha: float = 0.001
    masking_examples: int = 200
    gallery_examples: int = 8
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        # counts are stored as ints (4.0 counts as 4): a float count would first fail as a slice
        # bound after the attacks had run
        for name in ("margin_examples", "margin_steps", "certify_examples", "certify_n",
                     "masking_examples", "batch_size"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        if not _is_integer(self.gallery_examples) or self.gallery_examples < 0:
            raise ConfigError(f"gallery_examples must be an integer >= 0, got {self.gallery_examples!r}")
        if not _is_integer(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "gallery_examples", int(self.gallery_examples))
        object.__setattr__(self, "seed", int(self.seed))
        for name in ("certify_sigma", "certify_alpha"):  # a flag or text failed only after the attacks
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.certify_sigma) and self.certify_sigma > 0):
            raise ConfigError(f"certify_sigma must be a number > 0, got {self.certify_sigma!r}")
        if not 0 < self.certify_alpha < 1:
            raise ConfigError(f"certify_alpha must lie in (0, 1), got {self.certify_alpha!r}")


def _is_integer(value: object) -> bool:
    """An integer, or a float that holds one (4.0); not a flag, NaN or inf."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            and int(value) == value)


@dataclass
class ModelAnalysis:
    """JSON-ready sections of the report for one model (see docs/METRICS.md for each formula)."""

    attack: str  # label of the attack whose points the metrics, entropy and gallery use
    metrics: dict[str, Any]  # AdversarialMetrics: success, entropy, margin, per-class, confusion
    score: dict[str, Any]  # RobustnessScore from the evaluation's worst case and eps curve
    margin: dict[str, Any]  # minimal-norm distances in the threat's norm
    certified: dict[str, Any]  # randomized smoothing vs the L2 margin, per example
    masking: dict[str, Any]  # MaskingVerdict
    gallery: dict[str, Any]
    options: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    version: int = ANALYSIS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _check_setting(threat: ThreatModel, attack: Attack, report: RobustnessReport, n_examples: int) -> None:
    """Every number of the analysis is read against ``threat`` and the report's: the attack and the
    report must share the threat model, and the report must be of these examples."""
    if report.n_examples != n_examples:
        raise ConfigError(f"the robustness report was measured on {report.n_examples} examples, the "
                          f"analysis is given {n_examples}")
    if attack.threat != threat:
        raise ConfigError(f"attack {attack.label!r} uses {attack.threat.describe()} but the analysis's "
                          f"threat model is {threat.describe()}")
    measured = (report.threat.get("norm"), report.threat.get("eps"), list(report.threat.get("bounds", [])))
    if measured != (threat.norm, threat.eps, list(threat.bounds)):
        raise ConfigError(f"the robustness report was measured at {measured[0]} eps={measured[1]} "
                          f"box={measured[2]}, the analysis asks for {threat.describe()}")


def _check_report_matches(report: RobustnessReport, clean_correct: Tensor) -> None:
    """The report must be of this model: the examples it found clean-correct are the ones the model
    gets right here, but for the few that a mixed-precision evaluation may flip (2%, at least 2)."""
    if not report.clean_correct:
        return
    theirs = torch.tensor(report.clean_correct, dtype=torch.bool, device=clean_correct.device)
    differ = int((theirs != clean_correct).sum())
    if differ > max(2, math.ceil(_REPORT_DISAGREEMENT * len(theirs))):
        raise ConfigError(f"the robustness report is not of this model on these examples: it found "
                          f"{sum(report.clean_correct)} of {len(theirs)} classified correctly, the model "
                          f"gets {int(clean_correct.sum())} right here, and they differ on {differ}")


def analyse(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, attack: Attack,
            report: RobustnessReport, num_classes: int,
            options: AnalysisOptions | None = None) -> ModelAnalysis:
    """Every measurement of the report's per-model sections, on ``(x, y)`` (the test examples)."""
    options = options or AnalysisOptions()
    _check_setting(threat, attack, report, len(x))
    device = next(model.parameters(), x).device  # a model without parameters runs where x is
    x, y = x.to(device), as_class_indices(y).to(device)
    modes = save_modes(model)  # read before wrapping: a new wrapper starts in training mode
    model.eval()
    seconds: dict[str, float] = {}
    try:
        with _timed(seconds, "metrics"):
            clean_logits = _logits(model, x, options)
            if clean_logits.shape[1] != num_classes:
                raise ConfigError(f"num_classes={num_classes} but the model scores "
                                  f"{clean_logits.shape[1]} classes")
            clean_correct = predicted_class(clean_logits) == y
            _check_report_matches(report, clean_correct)
            if input_gradient(model, x[:1], y[:1]) is None:
                # as evaluate and the masking verdict do: gradient attacks on a model whose graph
                # does not reach its input stall on zeros instead of failing inside autograd
                model = ZeroGradientPath(model)
            x_adv = _attack_all(model, attack, x, y, clean_correct, options.batch_size)
            adv_logits = _logits(model, x_adv, options)
            metrics = adversarial_metrics(x, x_adv, y, clean_logits, adv_logits, threat, num_classes)
        with _timed(seconds, "margin"):
            margin = _margin(model, x, y, threat, options)
        with _timed(seconds, "certified"):
            certified = _certified(model, x, y, threat, num_classes, options)
        with _timed(seconds, "masking"):
            verdict = _masking(model, x[:options.masking_examples], y[:options.masking_examples],
                               threat, MaskingConfig(seed=options.seed))
    finally:
        restore_modes(modes)
    score = robustness_score(report.clean_accuracy, report.worst_case_accuracy,
                             eps=[p.eps for p in report.eps_curve] or None,
                             eps_accuracy=[p.accuracy for p in report.eps_curve] or None)
    return ModelAnalysis(
        attack=attack.label, metrics=metrics.to_dict(), score=score.to_dict(), margin=margin,
        certified=certified, masking=verdict.to_dict(),
        gallery=_gallery(x, x_adv, y, clean_logits, adv_logits, options.gallery_examples),
        options=asdict(options), seconds=seconds)


def _masking(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
             config: MaskingConfig) -> MaskingVerdict:
    """The masking verdict on ``(x, y)``; not judged, rather than an error that would throw away
    the rest of the analysis, when the model classifies none of these examples correctly."""
    try:
        return masking_verdict(model, x, y, threat, config=config)
    except NothingToJudge:
        return MaskingVerdict.not_judged(
            threat, len(y), config, f"Not judged: the model classifies none of these {len(y)} examples "
            "correctly, so no attack has anything to flip.")


class _timed:
    """Adds the wall time of a ``with`` block to ``seconds[key]``."""

    def __init__(self, seconds: dict[str, float], key: str) -> None:
        self.seconds, self.key = seconds, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.key] = time.perf_counter() - self.start


def _logits(model: nn.Module, x: Tensor, options: AnalysisOptions) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + options.batch_size])
                          for i in range(0, len(x), options.batch_size)])


def _attack_all(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, correct: Tensor,
                batch_size: int) -> Tensor:
    """The attack's points as ``evaluate`` computes them for an attack that is not cascaded: the
    examples classified right (``correct``), in order, in batches of ``batch_size``, each batch
    seeded with ``batch_seed``. A misclassified example keeps its input: it is an error without any
    attack."""
    index = correct.nonzero().squeeze(1)
    x_adv = x.clone()
    generator = torch.Generator(device=x.device)
    for start in range(0, len(index), batch_size):
        generator.manual_seed(batch_seed(attack.seed, start // batch_size))
        chunk = index[start:start + batch_size]
        x_adv[chunk] = attack(model, x[chunk], y[chunk], generator=generator)
    if not bool(attack.threat.contains(x_adv, x).all()):  # the contract, checked as in evaluate
        raise ThreatModelViolation(f"attack {attack.label!r} returned points outside "
                                   f"{attack.threat.describe()}")
    return x_adv


def _minimal_distances(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int,
                       seed: int) -> Tensor:
    """FMN's smallest adversarial distance per example (0 if misclassified, inf if none found)."""
    fmn = FMN(threat, steps=steps, seed=seed)
    _, norms = fmn.minimal(model, x, y)
    with torch.inference_mode():
        wrong = predicted_class(model(x)) != y
    return torch.where(wrong, torch.zeros_like(norms), norms)


def _margin(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
            options: AnalysisOptions) -> dict[str, Any]:
    n = options.margin_examples
    if threat.constrained:
        distances = _swept_distances(model, x[:n], y[:n], threat, options)
        attack = f"pgd-{options.margin_steps} sweep"
    else:
        distances = _minimal_distances(model, x[:n], y[:n], threat, options.margin_steps, options.seed)
        attack = f"fmn-{options.margin_steps}"
    grid = sorted({threat.eps * f for f in (0.25, 0.5, 1.0, 1.5, 2.0)})
    return {"norm": threat.norm, "attack": attack, "eps": threat.eps,
            "summary": distance_summary(distances, grid).to_dict(),
            "distances": [float(d) for d in distances.cpu()]}


def _swept_distances(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                     options: AnalysisOptions) -> Tensor:
    """Under a feature schema, where FMN's search in the plain norm does not apply: per example the
    smallest eps of a PGD sweep (eps / 4 to 4 eps in steps of eps / 4) at which PGD fools it, an
    upper bound on its distance in the schema's weighted norm to the grid's resolution (0 if
    misclassified, inf if no eps of the sweep fools it)."""
    # eps * (k / 4) is bit for bit the summary's eps * 0.25, 0.5, 1, 1.5 and 2
    grid = [threat.eps * (k / _SWEEP_STEPS_PER_EPS) for k in range(1, 4 * _SWEEP_STEPS_PER_EPS + 1)]
    with torch.inference_mode():
        correct = predicted_class(model(x)) == y
    fooled = []
    for eps in grid:
        pgd = PGD(threat.with_eps(eps), steps=options.margin_steps, early_stop=True, probe=True,
                  seed=options.seed)
        x_adv = pgd(model, x, y)
        with torch.inference_mode():
            fooled.append(predicted_class(model(x_adv)) != y)
    return minimal_distances_from_sweep(grid, torch.stack(fooled), correct)


def _certified(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, num_classes: int,
               options: AnalysisOptions) -> dict[str, Any]:
    """Certified L2 radius of the smoothed model next to the base model's measured L2 margin.

    The certificate bounds the smoothed classifier's distance to its boundary from below; FMN bounds
    the base classifier's from above. The two classifiers agree on most points but need not, so a
    radius above the margin is flagged for a look rather than called a contradiction.
    """
    n = options.certify_examples
    x, y = x[:n], y[:n]
    certificate = certify(model, x, sigma=options.certify_sigma, n=options.certify_n,
                          alpha=options.certify_alpha, num_classes=num_classes,
                          batch_size=query_batch(x.device), bounds=threat.bounds, seed=options.seed)
    correct = certificate.predictions == y
    # in the certificate's float64: a float32 copy rounds the largest radius up as often as down, and
    # the curve's last point, taken from it, then left out the examples certified exactly there
    radii = torch.where(correct, certificate.radii, torch.zeros_like(certificate.radii))
    # FMN's minimal search ignores eps, but a ThreatModel refuses one past the box's L2 diameter
    diameter = (threat.bounds[1] - threat.bounds[0]) * math.sqrt(math.prod(x.shape[1:]))
    l2 = ThreatModel("l2", min(1.0, diameter), threat.bounds)
    l2_margin = _minimal_distances(model, x, y, l2, options.margin_steps, options.seed)
    flagged = (radii > l2_margin.to(radii) + _RADIUS_SLACK).nonzero().flatten().tolist()
    top = max(float(radii.max()) if len(radii) else 0.0, options.certify_sigma)
    grid = [top * i / 10 for i in range(10)] + [top]  # the last point exactly top, not top * 10 / 10
    curve = certified_accuracy_curve(certificate, y, grid, num_classes)
    return {"sigma": options.certify_sigma, "n": options.certify_n, "alpha": options.certify_alpha,
            "curve": curve.to_dict(), "radii": [float(r) for r in radii.cpu()],
            "l2_margin": [float(d) for d in l2_margin.cpu()], "above_margin": flagged,
            "abstained": int(certificate.abstained.sum())}


def _gallery(x: Tensor, x_adv: Tensor, y: Tensor, clean_logits: Tensor, adv_logits: Tensor,
             count: int) -> dict[str, Any]:
    """The first ``count`` examples the attack fooled (images only), rounded for a small JSON."""
    if x.dim() != 4 or count == 0:
        return {"examples": []}
    clean_pred, adv_pred = predicted_class(clean_logits), predicted_class(adv_logits)
    fooled = ((clean_pred == y) & (adv_pred != y)).nonzero().flatten()[:count]
    examples = [{"index": int(i), "label": int(y[i]), "clean_prediction": int(clean_pred[i]),
                 "adversarial_prediction": int(adv_pred[i]),
                 "clean": _rounded(x[i]), "adversarial": _rounded(x_adv[i])} for i in fooled.tolist()]
    return {"shape": list(x.shape[1:]), "examples": examples}


def _rounded(image: Tensor) -> list[Any]:
    return (image.detach().float().cpu() * 1000).round().div(1000).tolist()
