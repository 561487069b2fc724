"""Giving freed memory back to the operating system between decoder blocks."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Calibration activations are many same-sized tensors allocated and freed block after block;
    glibc keeps the freed ones in its heaps, so without trimming the process's resident memory
    creeps upward across blocks even though the live data does not grow.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
