"""Image similarity for reconstructions: MSE, PSNR, SSIM, total variation and best-match assignment."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fortify.errors import DataError

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise DataError(f"images to compare have shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise DataError(f"expected a batch of images (N, ...), got shape {tuple(a.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per image."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).reshape(a.shape[0], -1).mean(dim=1)


def psnr(a: Tensor, b: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image in dB: ``10 log10(range^2 / MSE)`` (inf if equal)."""
    return 10.0 * torch.log10(data_range ** 2 / mse(a, b))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Window size and sigma: Wang et al.'s 11 and 1.5, shrunk in proportion for small images."""
    size = min(_SSIM_WINDOW, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre
    if size < 1:
        raise DataError(f"images of {height}x{width} pixels are too small for SSIM")
    return size, _SSIM_SIGMA * size / _SSIM_WINDOW


def ssim(a: Tensor, b: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image (Wang et al. 2004), averaged over channels and positions.

    Gaussian-weighted local statistics over windows that lie wholly inside the image, constants
    ``(0.01 L)^2`` and ``(0.03 L)^2``. Images are ``(N, C, H, W)``; ``(N, H, W)`` is one channel.
    Matches scikit-image's ``structural_similarity(gaussian_weights=True, sigma=...,
    use_sample_covariance=False)``.
    """
    _check_pair(a, b)
    if a.dim() == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if a.dim() != 4:
        raise DataError(f"SSIM needs images (N, C, H, W) or (N, H, W), got shape {tuple(a.shape)}")
    a, b = a.double(), b.double()
    channels, height, width = a.shape[1:]
    size, sigma = ssim_window(height, width)
    g = _gaussian_window(size, sigma, a.dtype, a.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size)

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return index.reshape(a.shape[0], -1).mean(dim=1)


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels, per image (anisotropic TV).

    Inputs that are not images (fewer than 3 dimensions per batch row) have no neighbours: 0. So
    has a dimension of size 1 (a row of pixels, a one-channel signal): it adds 0.
    """
    if x.dim() < 3:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return _mean_step(x, -2) + _mean_step(x, -1)


def _mean_step(x: Tensor, dim: int) -> Tensor:
    """Per image, the mean absolute difference between neighbours along ``dim`` (0 without any)."""
    if x.shape[dim] < 2:  # the mean over no pairs would be NaN
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return x.diff(dim=dim).abs().reshape(x.shape[0], -1).mean(dim=1)


def best_assignment(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """For each original, the index of the reconstruction matched to it (minimum total MSE).

    A batch reconstruction comes back in any order; the Hungarian algorithm pairs each original with
    one reconstruction so that the summed MSE is smallest.
    """
    _check_pair(reconstructions, originals)
    r = reconstructions.detach().double().reshape(len(reconstructions), -1).cpu()
    o = originals.detach().double().reshape(len(originals), -1).cpu()
    cost = torch.cdist(o, r).pow(2)
    # a reconstruction that diverged to NaN is the worst match for every original, not an error
    finite = torch.isfinite(cost)
    worst = 2 * float(cost[finite].max()) + 1 if bool(finite.any()) else 1.0
    cost = torch.where(finite, cost, worst)
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.empty(len(o), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return order


def psnr_from_mse(value: float, data_range: float = 1.0) -> float:
    return math.inf if value == 0 else 10.0 * math.log10(data_range ** 2 / value)
