"""Process memory tuning for CPU training (hand-written: torch has no CPU caching allocator switch)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed activation buffers instead of returning them to the OS.

    By default each large tensor (a batch-512 feature map is ~19 MB) is mmap-ed and unmapped, so
    every training step page-faults its activations back in; measured here that cost ~10% of a
    step and most of the SynOps counter's apparent overhead. Returns False where this is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
