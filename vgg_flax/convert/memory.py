"""Keeping the converter's memory near one copy of the weights: measuring it, handing freed
heap back, and host arrays that jax on CPU can use without copying."""
from __future__ import annotations

import ctypes
import resource
from typing import Any

import numpy as np


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it in per-thread arenas otherwise,
    and orbax/tensorstore free large buffers from worker threads)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: jax on CPU can then use the memory as it is
    (``device_put(..., may_alias=True)``) instead of copying the model once more."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + n].view(dtype).reshape(shape)


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
