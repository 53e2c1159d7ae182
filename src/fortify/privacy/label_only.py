"""Label-only membership inference (Choquette-Choo et al. 2021, "Label-Only Membership Inference
Attacks").

An attacker who sees only predicted labels still learns membership from how robust a prediction is:
models are more robust around the points they trained on. Two measures of that robustness:

- augmentation: the share of augmented copies (small shifts, flips, noise) still classified right;
- boundary distance: the distance from the input to the nearest point with another label, from any
  ``distance_fn(model, x, y) -> distances``; the default is HopSkipJump (decision-based, labels only);
  a white-box alternative runs fortify's PGD over an eps grid and bisects along the segment to the
  first adversarial point it finds.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.attacks import PGD
from fortify.attacks.base import check_positive_int
from fortify.attacks.hopskipjump import HopSkipJump
from fortify.data.base import Split
from fortify.errors import ConfigError
from fortify.models.modes import evaluation_mode
from fortify.models.predictions import predicted_class
from fortify.privacy._data import (
    check_member_sets,
    check_model_takes_labels,
    join,
    model_device,
    model_dtype,
    predict_logits,
    project_to_box,
    to_model,
)
from fortify.privacy.metrics import MembershipResult, membership_result, split_scores
from fortify.threat import NORMS, ThreatModel, check_in_box

DistanceFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _predict_labels(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    return predicted_class(predict_logits(model, x, batch_size)).cpu()


# -- augmentation robustness -----------------------------------------------------------------------

def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Translate images by (dy, dx) pixels, filling the uncovered border with its edge values."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def augmented_copies(x: Tensor, *, max_shift: int = 1, flip: bool = False, noise_std: float = 0.0,
                     noise_copies: int = 0, bounds: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """The original and its augmentations: all shifts up to ``max_shift`` pixels (optionally
    mirrored) and ``noise_copies`` copies with Gaussian noise of ``noise_std``, kept in the box.

    One copy at a time: all of them at once took 22 times the data's memory at the defaults (about
    15 GiB for CIFAR-10's 60,000 candidates). The settings are checked before the first copy."""
    check_augmentation_settings(max_shift, noise_std, noise_copies)
    if (max_shift > 0 or flip) and x.dim() != 4:
        raise ConfigError(f"shifts and flips need image batches (N, C, H, W), got {tuple(x.shape)}; "
                          "use max_shift=0, flip=False and noise for other inputs")
    return _copies(x, max_shift, flip, noise_std, noise_copies, bounds, generator)


def check_augmentation_settings(max_shift: int, noise_std: float, noise_copies: int) -> None:
    counts = (max_shift, noise_copies)
    whole = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts)
    if not whole or max_shift < 0 or noise_copies < 0 or not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"max_shift and noise_copies must be whole numbers >= 0 and noise_std a finite "
                          f"number >= 0, got {max_shift!r}, {noise_copies!r}, {noise_std!r}")


def _copies(x: Tensor, max_shift: int, flip: bool, noise_std: float, noise_copies: int,
            bounds: tuple[float, float], generator: torch.Generator | None) -> Iterator[Tensor]:
    for view in [x] + ([x.flip(-1)] if flip else []):
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                yield _shift(view, dy, dx)
    for _ in range(noise_copies):
        # drawn in float32 whatever x's dtype: one seed, the same noise for float32 and float64 data
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
        yield project_to_box(x + noise_std * noise, bounds)


def augmentation_scores(model: nn.Module, data: Split, *, max_shift: int = 1, flip: bool = False,
                        noise_std: float = 0.0, noise_copies: int = 0,
                        bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> Tensor:
    """Per example, the share of its augmented copies (the original included) classified right."""
    check_model_takes_labels(model, data.x, data.y, "data")
    generator = torch.Generator().manual_seed(seed)
    copies = augmented_copies(data.x, max_shift=max_shift, flip=flip, noise_std=noise_std,
                              noise_copies=noise_copies, bounds=bounds, generator=generator)
    y = data.y.cpu()
    correct, count = torch.zeros(len(y), dtype=torch.float64), 0
    for copy in copies:
        correct += _predict_labels(model, copy) == y
        count += 1
    return correct / count


def augmentation_attack(model: nn.Module, members: Split, non_members: Split, *, max_shift: int = 1,
                        flip: bool = False, noise_std: float = 0.0, noise_copies: int = 0,
                        bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                        fprs: Sequence[float] | None = None) -> MembershipResult:
    """Label-only attack by robustness to data augmentation (Choquette-Choo et al. 2021, Sec. 4)."""
    check_member_sets(members, non_members)
    check_augmentation_settings(max_shift, noise_std, noise_copies)
    for split in (members, non_members):  # copies are clipped to the box: data outside it would
        check_in_box(split.x, bounds)     # score their own clipping, not the model
    start = time.perf_counter()
    candidates, is_member = join(members, non_members)
    scores = augmentation_scores(model, candidates, max_shift=max_shift, flip=flip,
                                 noise_std=noise_std, noise_copies=noise_copies, bounds=bounds,
                                 seed=seed)
    inside, outside = split_scores(scores, is_member)
    settings = {"max_shift": max_shift, "flip": flip, "noise_std": noise_std,
                "noise_copies": noise_copies, "seed": seed}
    return membership_result("label-only-augmentation", inside, outside, settings=settings,
                             fprs=fprs, seconds=time.perf_counter() - start)


# -- distance to the decision boundary -------------------------------------------------------------

def _default_max_eps(norm: str, x: Tensor, bounds: tuple[float, float]) -> float:
    width = bounds[1] - bounds[0]
    return width / 2 if norm == "linf" else width * math.sqrt(x[0].numel()) / 4


def _wrong(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.inference_mode():
        return predicted_class(model(x)) != y


def _bisect_segment(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, steps: int) -> Tensor:
    """Per example the smallest t in [0, 1] (to bisection precision) with x + t (x_adv - x) misclassified.

    The segment stays in the box because the box is convex.
    """
    lo = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        flipped = _wrong(model, x + mid.reshape(shape) * (x_adv - x), y)
        hi = torch.where(flipped, mid, hi)
        lo = torch.where(flipped, lo, mid)
    return hi


def pgd_boundary_distance(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2",
                          eps_grid: Sequence[float] | None = None, steps: int = 20,
                          bisection_steps: int = 10, bounds: tuple[float, float] = (0.0, 1.0),
                          seed: int = 0) -> Tensor:
    """Distance to the nearest other label found by PGD, per example (an upper bound on the minimum).

    PGD runs at each eps of an increasing grid on the examples not yet fooled; for each newly fooled
    example a bisection along the segment to its adversarial point tightens the distance. A
    misclassified input has distance 0; one never fooled gets the largest eps of the grid.
    """
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    check_positive_int("bisection_steps", bisection_steps)
    check_model_takes_labels(model, x, y, "y")
    device = model_device(model)
    x, y = to_model(model, x), y.to(device)
    if eps_grid and not all(isinstance(e, numbers.Real) and not isinstance(e, bool) and math.isfinite(e)
                            and e > 0 for e in eps_grid):
        # the largest eps is the distance of an example never fooled: 0 or below would rank it as
        # a misclassified one
        raise ConfigError(f"eps_grid must hold finite numbers > 0, got {list(eps_grid)!r}")
    grid = sorted(eps_grid) if eps_grid else [
        _default_max_eps(norm, x, bounds) * 2.0 ** -k for k in range(6, -1, -1)]
    with evaluation_mode(model):
        distance = torch.full((len(x),), float(grid[-1]), dtype=x.dtype, device=device)
        distance[_wrong(model, x, y)] = 0.0
        todo = (distance > 0).nonzero().squeeze(1)
        for eps in grid:
            if todo.numel() == 0:
                break
            threat = ThreatModel(norm, eps, bounds)
            # no random start: from x itself the ascent heads straight for the nearest boundary (on a
            # linear model, exactly), where a random tilt would overstate the distance
            attack = PGD(threat, steps=steps, early_stop=True, random_start=False, seed=seed)
            x_adv = attack(model, x[todo], y[todo])
            fooled = _wrong(model, x_adv, y[todo])
            hit = todo[fooled]
            if hit.numel():
                t = _bisect_segment(model, x[hit], x_adv[fooled], y[hit], bisection_steps)
                distance[hit] = t * threat.distance(x_adv[fooled], x[hit]).to(x.dtype)
            todo = todo[~fooled]
    return distance.cpu()


def hopskipjump_boundary_distance(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2",
                                  max_queries: int = 1000, bounds: tuple[float, float] = (0.0, 1.0),
                                  seed: int = 0) -> Tensor:
    """Label-only distance to the nearest other label, from HopSkipJump (an upper bound on the minimum).

    HopSkipJump sees predicted labels only, so this is the distance a strictly label-only attacker
    measures. A misclassified input has distance 0; where the query budget found no other label the
    distance is the largest the box allows, so such an example ranks as most member-like.
    """
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    check_model_takes_labels(model, x, y, "y")
    device = model_device(model)
    x, y = to_model(model, x), y.to(device)
    width = bounds[1] - bounds[0]
    # eps is unused (the search is for the minimum) but must be valid: an L-inf eps of 1 is not in a
    # box narrower than 1, the box width is in every box
    threat = ThreatModel(norm, width, bounds)
    attack = HopSkipJump(threat, max_queries=check_positive_int("max_queries", max_queries), seed=seed)
    _, distance = attack.minimal(model, x, y)
    farthest = width if norm == "linf" else width * math.sqrt(x[0].numel())
    return torch.nan_to_num(distance, posinf=farthest).to(x.dtype).cpu()


def random_direction_distance(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2",
                              directions: int = 32, max_distance: float | None = None,
                              bisection_steps: int = 12, bounds: tuple[float, float] = (0.0, 1.0),
                              seed: int = 0) -> Tensor:
    """Label-only distance: along random directions, the nearest label change (min over directions).

    Each direction ``d`` (unit in ``norm``) gives the path ``box(x + r d)`` for r up to
    ``max_distance``; the first change of label on it is found by bisection and measured as the
    distance from ``x`` to that point. Uses predicted labels only, as a label-only attacker would.
    """
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    directions = check_positive_int("directions", directions)
    check_positive_int("bisection_steps", bisection_steps)
    if max_distance is not None and not (math.isfinite(max_distance) and max_distance > 0):
        raise ConfigError(f"max_distance must be a finite number > 0 (or None: the box's), got "
                          f"{max_distance!r}")
    check_model_takes_labels(model, x, y, "y")
    check_in_box(x, bounds)  # outside it, the rays would measure the distance to their own clipping
    device = model_device(model)
    x, y = to_model(model, x), y.to(device)
    radius = _default_max_eps(norm, x, bounds) if max_distance is None else max_distance
    unit = ThreatModel(norm, 1.0 if norm == "l2" else bounds[1] - bounds[0], bounds)
    best = torch.full((len(x),), float(radius), dtype=x.dtype, device=device)
    with evaluation_mode(model):
        best[_wrong(model, x, y)] = 0.0
        for d in _random_directions(directions, x.shape, seed=seed, device=device, dtype=x.dtype):
            d = unit.ascent_direction(d) if norm == "l2" else d.sign()
            best = torch.minimum(best, _ray_distance(model, x, y, d, radius, bisection_steps,
                                                     unit, bounds))
    return best.cpu()


def _random_directions(count: int, shape: torch.Size, *, seed: int, device: torch.device,
                       dtype: torch.dtype) -> Iterator[Tensor]:
    """``count`` standard normal tensors of ``shape``, on ``device`` in ``dtype``.

    They are drawn on the CPU in float32 and only then moved and cast: a CUDA generator draws other
    numbers than a CPU one for the same seed (and each dtype its own), so the attack's score would
    otherwise depend on the hardware it ran on.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _ray_distance(model: nn.Module, x: Tensor, y: Tensor, d: Tensor, radius: float, steps: int,
                  metric: ThreatModel, bounds: tuple[float, float]) -> Tensor:
    shape = (-1,) + (1,) * (x.dim() - 1)

    def point(r: Tensor) -> Tensor:
        return project_to_box(x + r.reshape(shape) * d, bounds)

    far = torch.full((len(x),), float(radius), dtype=x.dtype, device=x.device)
    flips = _wrong(model, point(far), y)
    lo, hi = torch.zeros_like(far), far.clone()
    for _ in range(steps):
        mid = (lo + hi) / 2
        flipped = _wrong(model, point(mid), y)
        hi = torch.where(flipped, mid, hi)
        lo = torch.where(flipped, lo, mid)
    reached = metric.distance(point(hi), x).to(x.dtype)
    return torch.where(flips, reached, torch.full_like(far, float(radius)))


def boundary_distance_attack(model: nn.Module, members: Split, non_members: Split, *,
                             distance_fn: DistanceFn | None = None, batch_size: int = 256,
                             fprs: Sequence[float] | None = None) -> MembershipResult:
    """Label-only attack by distance to the decision boundary (Choquette-Choo et al. 2021, Sec. 5).

    ``distance_fn(model, x, y)`` returns one distance per example (0 when misclassified); any
    minimum-norm attack fits. The default is ``hopskipjump_boundary_distance`` with L2: it uses
    predicted labels only, as the attack's threat model says; ``pgd_boundary_distance`` is a
    white-box alternative that finds shorter distances with gradients (on a linear model, the
    exact distance).
    """
    check_member_sets(members, non_members)
    check_positive_int("batch_size", batch_size)
    fn = distance_fn or functools.partial(hopskipjump_boundary_distance, norm="l2")
    start = time.perf_counter()
    candidates, is_member = join(members, non_members)
    # here, not only in the distance functions: a custom fn may not check
    check_model_takes_labels(model, candidates.x, candidates.y, "members and non-members")
    # in the model's dtype, as every prediction here is: a custom fn then takes float64 data, too
    x, y = candidates.x.to(model_dtype(model, candidates.x.dtype)), candidates.y
    scores = torch.cat([fn(model, x[i:i + batch_size], y[i:i + batch_size]).detach().double().cpu()
                        for i in range(0, len(candidates), batch_size)])
    inside, outside = split_scores(scores, is_member)
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "custom")
    return membership_result("label-only-boundary", inside, outside,
                             settings={"distance_fn": name}, fprs=fprs,
                             seconds=time.perf_counter() - start)
