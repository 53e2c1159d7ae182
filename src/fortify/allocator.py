"""Keep freed memory in the process instead of handing it back to the OS (Linux, glibc).

PyTorch's CPU tensors come from ``malloc``. glibc maps a large block afresh (mmap) and unmaps it
when freed, and it returns the free top of its heap to the OS once more than a threshold lies there
(both thresholds start at 128 KiB; the mmap one follows the largest block freed, up to 32 MiB). The
next tensor of that size then costs a page fault and a zeroed page per 4 KiB it touches. An attack
pays this on every call: its batch shrinks as examples fall, and between calls the memory goes back.
On the digits CNN, one run of PGD-10 took 10,000-54,000 page faults this way, depending on the
library; with the thresholds raised it took none (docs/PERFORMANCE.md, change log).

``keep_freed_memory`` raises both thresholds, as the PyTorch CPU tuning guides do by swapping in
jemalloc or tcmalloc; the process then keeps its peak heap for reuse instead of shrinking after each
batch. It is opt-in: the CLI calls it at start when ``FORTIFY_KEEP_FREED_MEMORY=1``, and a program
that uses fortify as a library calls it itself, since the setting holds for the whole process. Not
the default because whole ``fortify run`` jobs and training steps were no faster with it
(docs/PERFORMANCE.md, change log).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 1024 * 2**20  # free heap kept before any is returned to the OS
OPT_IN_VARIABLE = "FORTIFY_KEEP_FREED_MEMORY"


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set, False where
    the C library is not glibc (macOS, musl, Windows), which is left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success. Setting either threshold ends glibc's dynamic adjustment, and a
    # raised trim threshold over a fixed 128 KiB mmap threshold would map every block afresh (slower
    # than the default): the trim threshold is set only once the mmap threshold took
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def keep_freed_memory_if_asked() -> bool:
    """``keep_freed_memory()`` when the environment sets ``FORTIFY_KEEP_FREED_MEMORY=1``."""
    if os.environ.get(OPT_IN_VARIABLE, "0").strip() != "1":
        return False
    return keep_freed_memory()
