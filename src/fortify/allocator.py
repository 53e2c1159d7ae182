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
batch. The CLI does this at start unless ``FORTIFY_KEEP_FREED_MEMORY=0``: ``fortify run`` took 10-11%
less wall time with it (3.1 million page faults against 0.17 million, the same results, the same
peak memory to 0.4%; docs/PERFORMANCE.md, change log). A program that uses fortify as a library
calls it itself if it wants it, since the setting holds for the whole process, the caller's own
work and other libraries included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from fortify.errors import ConfigError

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 1024 * 2**20  # free heap kept before any is returned to the OS
SETTING_VARIABLE = "FORTIFY_KEEP_FREED_MEMORY"  # 1 (the CLI's default) or 0


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


def keep_freed_memory_unless_declined() -> bool:
    """``keep_freed_memory()`` unless the environment sets ``FORTIFY_KEEP_FREED_MEMORY=0``; True when
    the thresholds were set. Any value other than 0 or 1 is a ConfigError (a typo such as ``off``
    would otherwise pass for the default)."""
    value = os.environ.get(SETTING_VARIABLE, "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"{SETTING_VARIABLE} must be 1 (keep freed memory, the default) or 0 (glibc's own "
                          f"thresholds), got {value!r}")
    return value == "1" and keep_freed_memory()
