"""How many rows a forward-only model call should carry, by device.

Query-heavy measurements (HopSkipJump's Monte-Carlo samples, randomized smoothing's noisy copies)
are free to split their rows into calls of any size. A GPU wants large calls to fill its cores; on
a CPU a call's activations should stay in cache, and past that point each row costs more. Measured
on one CPU thread with the digits small-cnn (``bench/query_batch.py``, docs/PERFORMANCE.md):
HopSkipJump took 0.49 of its time with calls of 512 rows instead of 4,096 and found the same
distances; certification 0.97 with 512 instead of 1,024.
"""

from __future__ import annotations

import torch

CPU_QUERY_BATCH = 512
ACCELERATOR_QUERY_BATCH = 4096


def query_batch(device: torch.device) -> int:
    """Rows per forward-only call on ``device`` when the caller did not choose."""
    return CPU_QUERY_BATCH if device.type == "cpu" else ACCELERATOR_QUERY_BATCH
