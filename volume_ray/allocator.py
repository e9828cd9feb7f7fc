"""Keep freed memory for reuse, so forward passes stop page-faulting.

A forward pass allocates activations of a few MiB and frees them again. glibc's
malloc hands such blocks back to the kernel once the free space at the top of its
heap passes a trim threshold (or serves them by mmap), so the next pass faults every
page in anew, which can double the time of a small model's pass (docs/performance.md
has the figures). Raising
the thresholds keeps up to TRIM_BYTES of freed heap for reuse; blocks above MMAP_BYTES
still go straight back to the kernel, so the extra resident memory stays bounded: at
most TRIM_BYTES (512 MiB) more per process that trains or measures (a Tune trial, a
measuring actor, `volume-ray demo`). Other commands leave malloc alone, and
VOLUME_RAY_KEEP_FREED_MEMORY=0 in the environment turns it off everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_BYTES", "SWITCH", "TRIM_BYTES", "keep_freed_memory"]

MMAP_BYTES = 64 * 2**20  # blocks at least this large are mmapped and returned at once
TRIM_BYTES = 512 * 2**20  # free heap kept before any is handed back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
SWITCH = "VOLUME_RAY_KEEP_FREED_MEMORY"  # "0" leaves glibc's malloc as it is


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds for this process; False where there is no glibc
    (macOS, musl), which keeps its own allocator as it is, or where SWITCH is "0"."""
    if not sys.platform.startswith("linux") or os.environ.get(SWITCH) == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
