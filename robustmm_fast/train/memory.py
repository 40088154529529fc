"""Keep freed CPU memory for reuse: glibc's malloc returns every block of 32 MB or more (and,
under its dynamic threshold, many smaller ones) to the kernel on free(), so a training step on
CPU tensors of that size page-faults all of them back in at the next step. On a MOSI-shaped
CyIN step (batch 128, 50 tokens, MulT's 512-wide memory) that is 3.1-3.6 M page faults and
12-20 s of kernel time in a 45-75 s step; with keep_freed_memory 0.24 M and 0.6 s in 29.5 s
(tools/malloc_page_faults.py). PyTorch's CPU allocator has no cache of its own (its CUDA
allocator does, for the same reason).

keep_freed_memory() sets mallopt(M_MMAP_MAX, 0) (no block served by mmap: every block comes
from the heap and is reused) and mallopt(M_TRIM_THRESHOLD, 2 GiB - 1) (the heap is not
trimmed back to the kernel), for this process and the threads it starts. Resident memory
then stays at the run's peak until the process exits, as with the CUDA caching allocator.
The arithmetic is untouched (the same numbers, bit for bit). `robustmm` calls it in its own
processes (the CLI, the grid's workers); a library user may call it too. No-op (False) where
the C library is not glibc, or when ROBUSTMM_MALLOC=default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring); True if
    it took effect (now or on an earlier call)."""
    global _done
    if _done:
        return True
    if os.environ.get("ROBUSTMM_MALLOC", "").strip().lower() == "default":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
