"""Keeping freed CPU memory in the process: glibc malloc's thresholds, for training steps on a CPU.

glibc adjusts two thresholds as a program runs: a free block at the top of the heap is handed back
to the kernel once it exceeds the trim threshold (twice the largest recently freed block), and
blocks above the mmap threshold (at most 32 MiB) are mapped and unmapped one by one.  Memory handed
back is faulted in again, zeroed page by page, when the next step allocates it.  A VI or
MC-dropout step frees the gradients of its drawn weights (as large as the network) at the end of
every backward, which leaves that much free at the top of the heap, so glibc trims it and the next
step faults it in again.

``retain_freed_memory`` fixes both thresholds, so blocks up to 32 MiB come from the heap and up to
``trim_threshold_mb`` of freed memory stays in the process.  It is process-wide and one call is
enough; jemalloc or tcmalloc (``LD_PRELOAD``) keep freed memory the same way.  The ``bayeskern-finetune``
job calls it on CPU.
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX_MB = 32  # the largest mmap threshold glibc accepts on 64-bit systems
_INT_MAX_MB = (2**31 - 1) >> 20  # mallopt takes an int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (mallopt with its parameters), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory(trim_threshold_mb: int = 1024) -> bool:
    """Keep freed CPU memory in the process (see the module docstring): tensors up to 32 MiB come
    from glibc's heap, and freed memory at its top is kept until more than ``trim_threshold_mb`` MiB
    are free.  Returns True where applied, False where the C library is not glibc (nothing changes)."""
    if (
        isinstance(trim_threshold_mb, bool)
        or not isinstance(trim_threshold_mb, int)
        or not (0 <= trim_threshold_mb <= _INT_MAX_MB)
    ):
        raise ValueError(f"trim_threshold_mb must be an integer in [0, {_INT_MAX_MB}], got {trim_threshold_mb!r}")
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX_MB << 20)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20)
    return bool(mmap_ok and trim_ok)
