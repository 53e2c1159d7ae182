"""Batch augmentations on tensors, applied before the attack and driven by a ``torch.Generator``.

Every function takes a batch and a generator and returns new tensors; the same generator state
gives the same result, so a checkpointed generator makes a resumed run draw the same crops.
Random numbers are drawn on the generator's device and moved to the batch's device.

Geometric and erasing augmentations (``random_crop``, ``random_flip``, ``cutout``) work on image
batches ``(N, C, H, W)``. Their fill value must lie in the input box for the result to stay in it
(0 for the default box [0, 1]).

Mixing augmentations (``mixup``, ``cutmix``) return a ``MixedBatch``: the mixed inputs, both label
vectors and the mixing weight ``lam``. Labels stay integers because attacks ascend the loss of an
integer label: craft against ``MixedBatch.dominant`` (the label with the larger share), then train
on ``MixedBatch.loss``, which equals the cross-entropy against ``MixedBatch.soft_labels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fortify.data.base import host_to_device
from fortify.errors import ConfigError, DataError


def _check_images(x: Tensor) -> None:
    if x.dim() != 4:
        raise DataError(f"expected an image batch of shape (N, C, H, W), got {tuple(x.shape)}")


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ConfigError("augmentations need an explicit torch.Generator (generator=...) "
                          "so that runs are reproducible")
    return generator


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return host_to_device(torch.rand(n, generator=generator, device=generator.device), device)


def _integers(high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` integers uniform in ``[0, high)``."""
    return host_to_device(torch.randint(high, (n,), generator=generator, device=generator.device), device)


# -- geometric and erasing ---------------------------------------------------------------------

def random_crop(x: Tensor, padding: int, *, generator: torch.Generator, fill: float = 0.0) -> Tensor:
    """Pad each side by ``padding`` with ``fill``, then crop back to ``H x W`` at a random offset.

    The standard CIFAR augmentation (padding 4); each example gets its own offset.
    """
    _check_images(x)
    gen = _check_generator(generator)
    if isinstance(padding, bool) or int(padding) != padding or padding < 0:
        raise ConfigError(f"crop padding must be an integer >= 0, got {padding!r}")
    if padding == 0:
        return x.clone()
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    top = _integers(2 * padding + 1, n, gen, x.device)
    left = _integers(2 * padding + 1, n, gen, x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: Tensor, *, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    _check_images(x)
    gen = _check_generator(generator)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"flip probability must be in [0, 1], got {p!r}")
    flip = (_uniform(x.shape[0], gen, x.device) < p)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def cutout(x: Tensor, size: int, *, generator: torch.Generator, fill: float = 0.0) -> Tensor:
    """Fill a ``size x size`` square at a random centre with ``fill`` (DeVries & Taylor 2017).

    The centre may lie near the border, so the square can be partly outside the image, as in the
    paper.
    """
    _check_images(x)
    gen = _check_generator(generator)
    if isinstance(size, bool) or int(size) != size or size < 0:
        raise ConfigError(f"cutout size must be an integer >= 0, got {size!r}")
    if size == 0:
        return x.clone()
    n, _, h, w = x.shape
    top = _integers(h, n, gen, x.device) - size // 2
    left = _integers(w, n, gen, x.device) - size // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return x.masked_fill(square, fill)


@dataclass(frozen=True)
class Augment:
    """Crop, flip and cutout in that order; a setting of 0 (or False) turns its step off."""

    crop_padding: int = 0
    flip: bool = False
    cutout_size: int = 0
    fill: float = 0.0

    def __call__(self, x: Tensor, *, generator: torch.Generator) -> Tensor:
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator=generator, fill=self.fill)
        if self.flip:
            x = random_flip(x, generator=generator)
        if self.cutout_size:
            x = cutout(x, self.cutout_size, generator=generator, fill=self.fill)
        return x


# -- mixing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MixedBatch:
    """Mixed inputs whose target is ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)``."""

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    lam: float

    def loss(self, logits: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy against the soft target (linear in the target, so a mix of two CEs)."""
        ce_a = F.cross_entropy(logits, self.y_a, label_smoothing=label_smoothing)
        ce_b = F.cross_entropy(logits, self.y_b, label_smoothing=label_smoothing)
        return self.lam * ce_a + (1 - self.lam) * ce_b

    def soft_labels(self, num_classes: int) -> Tensor:
        one_a = F.one_hot(self.y_a, num_classes).to(self.x.dtype)
        one_b = F.one_hot(self.y_b, num_classes).to(self.x.dtype)
        return self.lam * one_a + (1 - self.lam) * one_b

    @property
    def dominant(self) -> Tensor:
        """The label with the larger share: the one to attack when the attack needs hard labels."""
        return self.y_a if self.lam >= 0.5 else self.y_b


def sample_beta(alpha: float, *, generator: torch.Generator) -> float:
    """One draw from ``Beta(alpha, alpha)`` using only ``generator``'s normal and uniform streams.

    ``torch.distributions`` cannot take a generator, so the draw is ``G1 / (G1 + G2)`` with gamma
    variates from Marsaglia and Tsang's method (2000), taken in log space: for a small alpha both
    variates can underflow to 0 (``U ** (1 / alpha)``), which made the ratio 0 / 0.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"mixing alpha must be a finite number > 0, got {alpha!r}")
    first = _sample_log_gamma(alpha, generator)
    second = _sample_log_gamma(alpha, generator)
    # G1 / (G1 + G2) = sigmoid(log G1 - log G2), with the exponential taken of a non-positive number
    gap = first - second
    return 1.0 / (1.0 + math.exp(-gap)) if gap >= 0 else math.exp(gap) / (1.0 + math.exp(gap))


def _sample_log_gamma(shape: float, generator: torch.Generator) -> float:
    """log of a Gamma(shape, 1) draw by Marsaglia-Tsang; shape < 1 is boosted to shape + 1 and
    scaled back."""
    log_boost = 0.0
    if shape < 1.0:
        # Gamma(a) = Gamma(a + 1) * U^(1/a); 1 - U keeps the base in (0, 1]
        uniform = float(torch.rand((), generator=generator, device=generator.device))
        log_boost = math.log(1.0 - uniform) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=generator, device=generator.device))
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = 1.0 - float(torch.rand((), generator=generator, device=generator.device))
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return math.log(d * v) + log_boost


def mixup(x: Tensor, y: Tensor, *, alpha: float = 1.0, generator: torch.Generator) -> MixedBatch:
    """mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``.

    A convex combination of points in the box stays in the box.
    """
    gen = _check_generator(generator)
    lam = sample_beta(alpha, generator=gen)
    perm = host_to_device(torch.randperm(x.shape[0], generator=gen, device=gen.device), x.device)
    return MixedBatch(lam * x + (1 - lam) * x[perm], y, y[perm], lam)


def cutmix(x: Tensor, y: Tensor, *, alpha: float = 1.0, generator: torch.Generator) -> MixedBatch:
    """CutMix (Yun et al. 2019): paste a box from a shuffled batch; ``lam`` is the kept area.

    The box covers a share ``1 - lam0`` of the image (``lam0 ~ Beta(alpha, alpha)``) around a
    uniform centre, clipped at the border; the returned ``lam`` is the exact share left unpasted.
    """
    _check_images(x)
    gen = _check_generator(generator)
    lam0 = sample_beta(alpha, generator=gen)
    perm = host_to_device(torch.randperm(x.shape[0], generator=gen, device=gen.device), x.device)
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam0)
    centre_row = int(torch.randint(h, (), generator=gen, device=gen.device))
    centre_col = int(torch.randint(w, (), generator=gen, device=gen.device))
    top, bottom = _clipped_span(centre_row, int(h * cut), h)
    left, right = _clipped_span(centre_col, int(w * cut), w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return MixedBatch(mixed, y, y[perm], lam)


def _clipped_span(centre: int, length: int, size: int) -> tuple[int, int]:
    return max(centre - length // 2, 0), min(centre + length // 2, size)
