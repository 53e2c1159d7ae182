"""Exact row matching: which inputs of one batch reappear in another.

Rows are compared by a digest of their bytes, then confirmed element by element, so the cost is one
pass over each batch rather than a comparison of every pair.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def row_digests(x: Tensor, labels: Tensor | None = None) -> list[bytes]:
    """A 128-bit BLAKE2 digest of each row's bytes (and label): equal rows, equal digests."""
    flat = (x.detach().reshape(len(x), -1).cpu() + 0).contiguous()  # + 0 turns -0.0 into +0.0
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same 16 bits as integers
        flat = flat.view(torch.int16)
    rows = flat.numpy()
    tags = [b""] * len(x) if labels is None else [int(v).to_bytes(8, "little", signed=True)
                                                  for v in labels.detach().cpu().tolist()]
    return [hashlib.blake2b(row.tobytes() + tag, digest_size=16).digest() for row, tag in zip(rows, tags)]


def matching_rows(a: Tensor, b: Tensor, a_labels: Tensor | None = None,
                  b_labels: Tensor | None = None) -> Tensor:
    """Pairs ``(i, j)`` with row ``a[i]`` equal to ``b[j]`` (and equal labels when given), one per row
    of ``a`` found in ``b``, compared in the coarser of the two dtypes: a float32 copy of a float64
    row is the same example, and in float64 it would match nothing."""
    common = coarser_dtype(a.dtype, b.dtype)
    a, b = a.to(common), b.to(common)
    where_in_b = {digest: j for j, digest in enumerate(row_digests(b, b_labels))}
    pairs = [(i, where_in_b[digest]) for i, digest in enumerate(row_digests(a, a_labels))
             if digest in where_in_b]
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long)
    hit, candidate = torch.tensor(pairs, dtype=torch.long).unbind(dim=1)
    # two different rows sharing a digest is astronomically unlikely; confirm exactly anyway
    same = (a[hit].reshape(len(hit), -1).cpu() == b[candidate].reshape(len(hit), -1).cpu()).all(dim=1)
    return torch.stack([hit[same], candidate[same]], dim=1)


def shared_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pairs ``(i, j)`` with ``a[i] == b[j]`` exactly, one pair per row of ``a`` found in ``b``."""
    return matching_rows(a, b)


def input_groups(x: Tensor) -> Tensor:
    """A group number per row, shared by rows with identical inputs (numbered by first appearance)."""
    first: dict[bytes, int] = {}
    return torch.tensor([first.setdefault(d, len(first)) for d in row_digests(x)], dtype=torch.long)


def coarser_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two floating dtypes (torch's promotion for anything else)."""
    if a == b or not (a.is_floating_point and b.is_floating_point):
        return torch.promote_types(a, b)
    return a if torch.finfo(a).eps > torch.finfo(b).eps else b
