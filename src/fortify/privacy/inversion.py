"""Model inversion, MI-Face (Fredrikson et al. 2015, "Model Inversion Attacks that Exploit
Confidence Information and Basic Countermeasures").

For each class the attack climbs the model's confidence in that class from a neutral input, with a
total-variation prior that keeps the image smooth, and stays inside the input box. What the result
reveals is measured against the class means of the training data (MSE, SSIM) and by a separately
trained evaluation model: if that model recognises the class in the reconstruction, the target
leaked what its class looks like, not merely a pattern only it responds to.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.data.base import Split
from fortify.errors import ConfigError, DataError
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import predicted_class
from fortify.privacy._data import (
    check_model_takes_labels,
    check_split,
    model_device,
    predict_logits,
    project_to_box,
    to_model,
)
from fortify.privacy.similarity import mse, ssim, total_variation
from fortify.threat import check_in_box

Objective = Literal["probability", "log-probability", "logit"]
OBJECTIVES: tuple[str, ...] = ("probability", "log-probability", "logit")


@dataclass
class InversionReport:
    """Per-class quality of MI-Face reconstructions; ``images`` stay out of ``to_dict``."""

    classes: list[int]
    settings: dict[str, Any]
    target_confidence: list[float]  # the target model's probability of the class
    mse_to_class_mean: list[float]
    ssim_to_class_mean: list[float]
    start_mse_to_class_mean: list[float]  # the neutral start's MSE, for comparison
    nearest_mean_accuracy: float  # share of reconstructions closest (MSE) to their own class mean
    evaluator_predictions: list[int] | None
    evaluator_accuracy: float | None
    chance_accuracy: float
    seconds: float
    images: Tensor | None = field(default=None, repr=False)

    @property
    def mean_mse(self) -> float:
        return sum(self.mse_to_class_mean) / len(self.mse_to_class_mean)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim_to_class_mean) / len(self.ssim_to_class_mean)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "images"}
        data["mean_mse"], data["mean_ssim"] = self.mean_mse, self.mean_ssim
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InversionReport:
        names = {f.name for f in fields(cls)} - {"images"}
        report = cls(**{k: v for k, v in data.items() if k in names})
        # privacy.json holds the NaN SSIM of non-images as null: read it back as NaN, so the means
        # are those of the report that was written
        report.ssim_to_class_mean = [math.nan if v is None else v for v in report.ssim_to_class_mean]
        return report


def _class_objective(logits: Tensor, classes: Tensor, objective: str) -> Tensor:
    """Per-example cost to minimise; Fredrikson et al.'s is ``1 - p_c``."""
    if objective == "probability":
        return 1.0 - logits.softmax(dim=1).gather(1, classes.unsqueeze(1)).squeeze(1)
    if objective == "log-probability":
        return F.cross_entropy(logits, classes, reduction="none")
    return -logits.gather(1, classes.unsqueeze(1)).squeeze(1)


def neutral_start(input_shape: Sequence[int], n: int, bounds: tuple[float, float]) -> Tensor:
    """The box centre: an input that favours no class's pattern."""
    return torch.full((n, *input_shape), 0.5 * (bounds[0] + bounds[1]))


def _check_classes(model: nn.Module, classes: Sequence[int], x: Tensor) -> None:
    """Refuse an empty list or a class the model has no output for (one forward pass of ``x[:1]``)."""
    if len(classes) == 0:
        raise ConfigError("classes is empty: name at least one class of the model")
    outputs = predict_logits(model, x[:1]).shape[1]
    outside = sorted({int(c) for c in classes} - set(range(outputs)))
    if outside:
        raise ConfigError(f"classes {outside} are not among the model's {outputs} outputs "
                          f"(allowed: 0..{outputs - 1})")


def invert_classes(model: nn.Module, classes: Sequence[int], input_shape: Sequence[int], *,
                   steps: int = 200, lr: float = 0.05, tv_weight: float = 0.05,
                   objective: Objective = "probability", start: Tensor | None = None,
                   bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """MI-Face: one reconstruction per class by Adam on ``cost_c(x) + tv_weight * TV(x)``.

    ``lr`` and ``TV`` are measured in box widths, so the result does not depend on the box's units.
    All classes are inverted together as one batch (their costs are independent). Every iterate is
    projected into the box. Deterministic: no random start.
    """
    steps = check_positive_int("steps", steps)
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown inversion objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(tv_weight) and tv_weight >= 0):
        raise ConfigError(f"lr must be a finite number > 0 and tv_weight a finite number >= 0, got "
                          f"lr={lr}, tv_weight={tv_weight}")
    _check_classes(model, classes, neutral_start(input_shape, 1, bounds))
    device = model_device(model)
    targets = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    x0 = start if start is not None else neutral_start(input_shape, len(targets), bounds)
    if x0.shape != (len(targets), *input_shape):
        raise DataError(f"start must have shape {(len(targets), *input_shape)}, got {tuple(x0.shape)}")
    if start is not None:
        check_in_box(x0, bounds)
    lo, width = float(bounds[0]), float(bounds[1]) - float(bounds[0])
    # Adam moves each coordinate by about lr and TV grows with the units of the input, so the search
    # runs on the position inside the box as a share of its width: lr and tv_weight then mean the
    # same for data in [0, 1] and in [0, 255] (in [0, 1] nothing changes)
    share = ((to_model(model, x0) - lo) / width).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([share], lr=lr)
    with evaluation_mode(model), torch.enable_grad():
        for _ in range(steps):
            logits = model(lo + width * share)
            cost = _class_objective(logits, targets, objective) + tv_weight * total_variation(share)
            # the gradient with respect to the input only: the model's own .grad stays untouched
            (share.grad,) = torch.autograd.grad(cost.sum(), share)
            optimizer.step()
            with torch.no_grad():
                share.copy_(project_to_box(share, (0.0, 1.0)))
    return project_to_box(lo + width * share.detach(), bounds)


def class_means(train: Split, classes: Sequence[int]) -> Tensor:
    """The mean training input of each class (what an inversion could at best recover)."""
    means = []
    for cls in classes:
        chosen = train.x[train.y == cls]
        if len(chosen) == 0:
            raise DataError(f"class {cls} has no training examples to compare its inversion with")
        means.append(chosen.double().mean(dim=0))
    return torch.stack(means)


def _image_ssim(a: Tensor, b: Tensor, data_range: float) -> list[float]:
    """SSIM per image, or NaN for inputs that are not images of at least 3x3 pixels."""
    if a.dim() in (3, 4) and min(a.shape[-2:]) >= 3:
        return ssim(a, b, data_range=data_range).tolist()
    return [float("nan")] * len(a)


def _nearest_mean_accuracy(reconstructions: Tensor, classes: list[int], train: Split) -> float:
    """Share of reconstructions whose nearest class mean (Euclidean) is their own class's."""
    labels = sorted(int(c) for c in train.y.unique())
    means = class_means(train, labels).reshape(len(labels), -1)
    nearest = torch.cdist(reconstructions.reshape(len(reconstructions), -1).double(), means).argmin(1)
    return sum(labels[int(i)] == c for i, c in zip(nearest, classes)) / len(classes)


def _evaluator_verdict(evaluator: nn.Module | None, reconstructions: Tensor, classes: list[int]
                       ) -> tuple[list[int] | None, float | None]:
    if evaluator is None:
        return None, None
    predictions = predicted_class(predict_logits(evaluator, reconstructions)).cpu().tolist()
    return predictions, sum(p == c for p, c in zip(predictions, classes)) / len(classes)


def evaluate_inversion(model: nn.Module, reconstructions: Tensor, classes: Sequence[int],
                       train: Split, *, evaluator: nn.Module | None = None,
                       bounds: tuple[float, float] = (0.0, 1.0), settings: dict[str, Any] | None = None,
                       seconds: float = 0.0) -> InversionReport:
    """Compare reconstructions with the class means and let ``evaluator`` classify them.

    MSE is divided by the squared box width, so 0 is identical and 1 the largest possible error.
    """
    check_split(train, "training data")
    check_in_box(train.x, bounds)  # the MSE is scaled so that the box's width squared is 1
    classes = [int(c) for c in classes]
    recon = reconstructions.detach().cpu()
    _check_classes(model, classes, recon)
    means = class_means(train, classes).to(recon.dtype)
    start = neutral_start(recon.shape[1:], len(classes), bounds).to(recon.dtype)
    scale = (bounds[1] - bounds[0]) ** 2
    probabilities = predict_logits(model, recon).softmax(1).cpu()
    predictions, accuracy = _evaluator_verdict(evaluator, recon, classes)
    return InversionReport(
        classes=classes, settings=dict(settings or {}),
        target_confidence=probabilities[torch.arange(len(classes)), classes].tolist(),
        mse_to_class_mean=(mse(recon, means) / scale).tolist(),
        ssim_to_class_mean=_image_ssim(recon, means, bounds[1] - bounds[0]),
        start_mse_to_class_mean=(mse(start, means) / scale).tolist(),
        nearest_mean_accuracy=_nearest_mean_accuracy(recon, classes, train),
        evaluator_predictions=predictions, evaluator_accuracy=accuracy,
        chance_accuracy=1.0 / probabilities.shape[1], seconds=seconds, images=recon)


def model_inversion(model: nn.Module, train: Split, *, evaluator: nn.Module | None = None,
                    classes: Sequence[int] | None = None, steps: int = 200, lr: float = 0.05,
                    tv_weight: float = 0.05, objective: Objective = "probability",
                    bounds: tuple[float, float] = (0.0, 1.0)) -> InversionReport:
    """MI-Face on every class (or ``classes``), evaluated against ``train``'s class means.

    ``train`` is the target's training data, used only to measure what leaked; ``evaluator`` is a
    model trained separately (other seed or architecture) on the same task.
    """
    check_split(train, "training data")
    check_in_box(train.x, bounds)  # before the inversion: its measure needs the data inside the box
    # its classes are the model's: a label past them means data from another task
    check_model_takes_labels(model, train.x, train.y, "training data")
    if classes is None:
        classes = sorted(int(c) for c in train.y.unique())
    start_time = time.perf_counter()
    images = invert_classes(model, classes, tuple(train.x.shape[1:]), steps=steps, lr=lr,
                            tv_weight=tv_weight, objective=objective, bounds=bounds)
    settings = {"steps": steps, "lr": lr, "tv_weight": tv_weight, "objective": objective,
                "start": "box centre", "optimizer": "adam"}
    return evaluate_inversion(model, images, classes, train, evaluator=evaluator, bounds=bounds,
                              settings=settings, seconds=time.perf_counter() - start_time)
