"""Freed memory kept for reuse by later runs (Linux / glibc; elsewhere a no-op), as PyTorch's GPU allocator does.

A click's large activations (up to about 45 MB each at lung1's 272 sequences) are above glibc's mmap
threshold: every one is mapped fresh from the kernel, faulted in page by page on first write and unmapped
when freed, several times per scale: about 10^5 page faults per lung1 click, roughly 15 % of its time on a
2-core virtual machine (`arseg bench` reports the faults). With the mmap and trim thresholds raised, freed blocks stay
in the heap and the next block of that size reuses them: a few page faults per click. The cost is that the
process keeps its peak inference memory (about 1 GB for a lung1 click) until `release_freed_memory()`, which
restores glibc's defaults and hands the memory back (the Slicer module calls it when it is closed).
Set ARSEG_HEAP_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' documented defaults
KEEP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from, and go back to, the heap

_lock = threading.Lock()
_keeping = False
_libc: Optional[ctypes.CDLL] = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                _libc = libc
        except OSError:
            pass
    return _libc


def keeping_freed_memory() -> bool:
    return _keeping


def keep_freed_memory() -> bool:
    """Keep freed blocks for reuse from now on (idempotent, cheap to call before every run). Returns whether
    the allocator is tuned (False off glibc, or with ARSEG_HEAP_TUNING=0)."""
    global _keeping
    if _keeping or os.environ.get("ARSEG_HEAP_TUNING", "1") == "0" or _glibc() is None:
        return _keeping
    with _lock:
        if not _keeping:
            ok = _glibc().mallopt(M_MMAP_THRESHOLD, KEEP_THRESHOLD) and _glibc().mallopt(M_TRIM_THRESHOLD,
                                                                                         KEEP_THRESHOLD)
            _keeping = bool(ok)
    return _keeping


def release_freed_memory() -> None:
    """glibc's default thresholds again, and the kept memory handed back to the operating system."""
    global _keeping
    with _lock:
        if _keeping:
            _glibc().mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            _glibc().mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            _glibc().malloc_trim(0)
            _keeping = False
