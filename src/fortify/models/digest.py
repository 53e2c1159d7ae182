"""A fingerprint of a model's weights: what a record made with one model must not be reused for another."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def tensor_bytes(tensor: Tensor) -> bytes:
    """The raw bytes of ``tensor`` in row-major order, so that every dtype (bf16 included, which numpy
    lacks) hashes alike."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def update_with_weights(digest: hashlib._Hash, model: nn.Module) -> None:
    """Feed ``model``'s parameters and buffers (by name) into ``digest``."""
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s parameters and buffers, by name."""
    digest = hashlib.sha256()
    update_with_weights(digest, model)
    return digest.hexdigest()
