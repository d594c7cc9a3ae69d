"""glibc's heap policy on the CPU, where PyTorch has no caching allocator: every tensor is a malloc.

By default glibc hands a freed buffer of a few MB back to the kernel (munmap, or trimming its heap's
top), so each training step faults the same memory in again, page by page. On the 2-core CPU VM of
this project, converting 70M weights to bf16 took 35-600 ms that way against 7-8 ms from memory
kept; a bf16 training step of such a model (autocast casts every weight, backward every gradient)
ran about 20% faster with its memory kept (benchmarks/vs_trl.py). A run on the CPU therefore keeps
what it frees, as the CUDA caching allocator does on a GPU, and gives it back where it should
(`trim`: a released reference, ZeRO-3's gathered layers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LARGEST_HEAP_ALLOCATION = 32 << 20  # glibc's cap on M_MMAP_THRESHOLD (64-bit); larger buffers stay mmap'd
NEVER_TRIM = 2**31 - 1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(device: torch.device) -> None:
    """On the CPU, freed tensors below 32 MiB stay in the process for the next ones. A user's own
    glibc malloc settings (environment) are left as they are."""
    if device.type == "cpu" and _libc() is not None and not any(os.environ.get(v) for v in USER_SETTINGS):
        _libc().mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_ALLOCATION)
        _libc().mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)


def trim(device: torch.device) -> None:
    """On the CPU, gives freed memory back to the OS (glibc's `malloc_trim`).

    Measured on a 303M-parameter fp32 reference partitioned over 2 ranks (0.6 GB each): RSS per
    rank peaked at 1.5-1.7 GB, grew ~12 MB per layer within a forward, and stayed at 1.1 GB after
    the reference was dropped; trimming after each layer holds the peak at 1.1 GB.
    """
    if device.type == "cpu" and _libc() is not None:
        _libc().malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only
    except OSError:
        return None
