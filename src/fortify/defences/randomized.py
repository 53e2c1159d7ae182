"""Randomised input transforms: random resize-and-pad and additive Gaussian noise.

Both give a fresh random transform on every call, so a single gradient is one sample of a random
quantity and a single forward pass is one sample of the prediction. Plain PGD then follows noisy
directions; Expectation over Transformation (``fortify.attacks.adaptive.EOT``) averages them away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.defences.base import DEFENCES, InputTransformDefence, check_number_in
from fortify.errors import DataError


class RandomResizePad(InputTransformDefence):
    """Xie, Wang, Zhang, Ren & Yuille, ICLR 2018: resize to a random size, pad at a random place.

    The paper enlarges a 299-pixel image to a random size below 331 and pads it to 331, so the
    network's input grows. Here the output keeps the input's size, so any trained model can sit
    behind the defence: each image is shrunk by a random factor in ``[min_scale, 1]`` (bilinear) and
    placed at a random position on a canvas of the box's lower bound. Every image draws its own
    factor and position; one ``grid_sample`` call does the whole batch.
    """

    randomized = True

    def __init__(self, model: nn.Module, *, min_scale: float = 0.8, bounds: tuple[float, float] = (0.0, 1.0),
                 seed: int = 0) -> None:
        super().__init__(model, bounds=bounds, seed=seed)
        self.min_scale = check_number_in("min_scale", min_scale, above=0.0, at_most=1.0)

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise DataError(f"random resize-and-pad needs images (N, C, H, W), got shape {tuple(x.shape)}")
        n, generator = x.shape[0], self.generator(x.device)
        if x.numel() == 0:  # affine_grid refuses a batch of no images, or of empty ones
            return x
        # in float32 at least, and outside autocast: in half precision the grid holds three digits,
        # so bilinear sampling read the wrong pixels and grid_sample gave NaN; under bf16 autocast
        # affine_grid's product ran in bf16 and even the identity transform blurred the image
        work = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            # one row of draws per image: its factor and position do not depend on the batch's size
            draw = torch.rand(n, 3, generator=generator, device=x.device, dtype=work)
            scale = self.min_scale + (1 - self.min_scale) * draw[:, 0]
            # the centre moves at most (1 - scale) in normalised coordinates: the image stays on the canvas
            shift = (1 - scale)[:, None] * (2 * draw[:, 1:] - 1)
            theta = torch.zeros(n, 2, 3, device=x.device, dtype=work)
            theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
            theta[:, :, 2] = -shift / scale[:, None]
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            lo, hi = self.bounds
            # grid_sample pads with zeros, so shift the box to make the padding the box's lower bound;
            # its bilinear weights sum to 1 only to rounding, which overshoots a face of a wide box
            # (255.00003 in a 0..255 box): clamp
            resampled = F.grid_sample(x.to(work) - lo, grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)
        # clamped again in the input's dtype, whose rounding can carry a value past a face
        return (resampled + lo).clamp(lo, hi).to(x.dtype).clamp(lo, hi)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}, seed={self.seed}"


class GaussianNoise(InputTransformDefence):
    """Adds ``N(0, sigma^2)`` noise to every input value on every call (not clipped to the box).

    The noise is the same one randomised smoothing trains with (Cohen, Rosenfeld & Kolter 2019), but
    here a single noisy prediction is returned, without the majority vote or a certificate.
    """

    randomized = True

    def __init__(self, model: nn.Module, *, sigma: float = 0.25, bounds: tuple[float, float] = (0.0, 1.0),
                 seed: int = 0) -> None:
        super().__init__(model, bounds=bounds, seed=seed)
        self.sigma = check_number_in("sigma", sigma, above=0.0)

    def transform(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator(x.device), device=x.device, dtype=x.dtype)
        return x + self.sigma * noise

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, seed={self.seed}"


DEFENCES.add("random-resize-pad", RandomResizePad)
DEFENCES.add("gaussian-noise", GaussianNoise)
