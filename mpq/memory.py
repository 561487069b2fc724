"""Giving memory back to the operating system: freed heap pages, and weight pages not in use."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from functools import lru_cache
from typing import Iterable

import torch

MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now; contents never change


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _malloc_trim():
    libc = _libc()
    return getattr(libc, "malloc_trim", None)  # absent outside glibc (e.g. musl)


def page_out(tensors: Iterable[torch.Tensor]) -> None:
    """Ask the kernel to reclaim the memory pages wholly inside these CPU tensors (MADV_PAGEOUT).

    Weights that transformers loads from safetensors are pages of the memory-mapped file: once
    paged out they leave this process's resident memory and come back from the page cache when
    next read, so the weights of blocks not being processed need not stay resident.  Pages of
    ordinary (anonymous) memory stay put where there is no swap.  Contents never change; where
    the call is unsupported it does nothing.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            libc.madvise(first, last - first, MADV_PAGEOUT)


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Calibration activations are many same-sized tensors allocated and freed block after block;
    glibc keeps the freed ones in its heaps, so without trimming the process's resident memory
    creeps upward across blocks even though the live data does not grow.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
