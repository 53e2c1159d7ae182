"""JPEG compression as an input transform (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018).

The codec's lossy step is written in torch so that it runs on any device and inside the model's
graph: 8x8 block DCT, division by the quality-scaled quantisation table of the JPEG standard
(ITU-T T.81 Annex K), rounding, and the inverse. Colour images go through the JFIF YCbCr transform,
with the luminance table on Y and the chrominance table on Cb and Cr; chroma is not subsampled and
no entropy coding is needed, as it is lossless. Like libjpeg, the codec works on 8-bit samples: the
input pixels, the YCbCr planes after the colour transform, the planes after the inverse DCT and the
decoded pixels are each rounded to 0..255.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortify.defences.base import DEFENCES, InputTransformDefence, check_int_in
from fortify.errors import DataError
from fortify.threat import LOW_PRECISION

_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4
# JFIF (ITU-T T.871) RGB -> YCbCr, with 128 added to Cb and Cr afterwards
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_BLOCK = 8


def quality_table(base: Tensor, quality: int) -> Tensor:
    """The libjpeg (IJG) scaling of a base table to ``quality`` in 1..100."""
    # libjpeg's jpeg_quality_scaling divides in integers: 5000 / 30 is 166, not 166.67, and the
    # tables of 34 qualities below 50 differ when it is not truncated
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return torch.floor((base * scale + 50) / 100).clamp(1, 255)


def dct_matrix(size: int = _BLOCK) -> Tensor:
    """Orthonormal DCT-II matrix ``C``: the 2-D transform of a block ``B`` is ``C @ B @ C.T``."""
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix


class JPEGCompression(InputTransformDefence):
    """Compresses every image at ``quality`` (1..100) and decodes it before the model sees it.

    Rounding the DCT coefficients is flat almost everywhere, so the input gradient is exactly zero
    and gradient attacks stall; BPDA with the identity approximation breaks the defence.
    """

    differentiable = False

    def __init__(self, model: nn.Module, *, quality: int = 75,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(model, bounds=bounds)
        self.quality = check_int_in("quality", quality, 1, 100)
        self._build_constants(torch.device("cpu"))

    def _build_constants(self, device: torch.device) -> None:
        """The DCT matrix and quantisation tables, in float32, as buffers that move with the module."""
        self.register_buffer("dct", dct_matrix().float().to(device), persistent=False)
        tables = torch.tensor([_LUMA_TABLE, _CHROMA_TABLE], dtype=torch.float32)
        self.register_buffer("tables", quality_table(tables, self.quality).to(device), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # a cast of the module to bf16 or fp16 (to run a half-precision model) rounds the codec's
        # constants, and the codec would no longer be JPEG's: rebuild them in float32
        if self.dct.dtype in LOW_PRECISION:
            self._build_constants(self.dct.device)
        return self

    def transform(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise DataError(f"JPEG compression needs images (N, C, H, W), got shape {tuple(x.shape)}")
        # the codec in float32 whatever the input's dtype or an enclosing autocast: in bf16 or fp16
        # its block transforms round to other coefficients, and the decoded image is not JPEG's
        with torch.autocast(x.device.type, enabled=False):
            # a face of the box that float32 cannot hold (0.3) may round past itself: clamp in x's dtype
            return self._codec(x.float()).to(x.dtype).clamp(*self.bounds)

    def _codec(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds
        pixels = _samples((x - lo) / (hi - lo) * 255)
        colour = x.shape[1] == 3
        planes = _samples(_to_ycbcr(pixels)) if colour else pixels
        decoded = self._compress_planes(planes, colour)
        decoded = _to_rgb(decoded) if colour else decoded
        return _samples(decoded) / 255 * (hi - lo) + lo

    def _compress_planes(self, planes: Tensor, colour: bool) -> Tensor:
        n, c, h, w = planes.shape
        pad_h, pad_w = -h % _BLOCK, -w % _BLOCK
        # the standard pads a partial block by repeating the edge
        padded = F.pad(planes, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else planes
        blocks = _to_blocks(padded - 128)
        dct = self.dct.to(planes.dtype)
        table = self._plane_tables(c, colour).to(planes.dtype).reshape(1, c, 1, 1, _BLOCK, _BLOCK)
        coefficients = dct @ blocks @ dct.T
        quantised = torch.round(coefficients / table) * table
        restored = dct.T @ quantised @ dct + 128
        return _samples(_from_blocks(restored, padded.shape)[:, :, :h, :w])

    def _plane_tables(self, channels: int, colour: bool) -> Tensor:
        if colour:
            return self.tables[[0, 1, 1]]
        return self.tables[0].expand(channels, _BLOCK, _BLOCK)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, bounds={self.bounds}"


def _samples(values: Tensor) -> Tensor:
    """Values as libjpeg holds them between its stages: 8-bit samples (JSAMPLE), 0..255."""
    return torch.round(values).clamp(0, 255)


def _to_blocks(planes: Tensor) -> Tensor:
    n, c, h, w = planes.shape
    blocks = planes.reshape(n, c, h // _BLOCK, _BLOCK, w // _BLOCK, _BLOCK)
    return blocks.permute(0, 1, 2, 4, 3, 5)


def _from_blocks(blocks: Tensor, shape: torch.Size) -> Tensor:
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(shape)


def _to_ycbcr(rgb: Tensor) -> Tensor:
    matrix = torch.tensor(_RGB_TO_YCBCR, dtype=rgb.dtype, device=rgb.device)
    offset = torch.tensor([0.0, 128.0, 128.0], dtype=rgb.dtype, device=rgb.device).reshape(1, 3, 1, 1)
    return torch.einsum("ij,njhw->nihw", matrix, rgb) + offset


def _to_rgb(ycbcr: Tensor) -> Tensor:
    matrix = torch.linalg.inv(torch.tensor(_RGB_TO_YCBCR, dtype=torch.float64)).to(ycbcr)
    offset = torch.tensor([0.0, 128.0, 128.0], dtype=ycbcr.dtype, device=ycbcr.device).reshape(1, 3, 1, 1)
    return torch.einsum("ij,njhw->nihw", matrix, ycbcr - offset)


DEFENCES.add("jpeg", JPEGCompression)
