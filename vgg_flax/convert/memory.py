"""Keeping the converter's memory near one copy of the weights: measuring it, handing freed
heap back, and host arrays that jax on CPU can use without copying."""
from __future__ import annotations

import ctypes
import resource

from vgg_flax.weights import empty_aligned  # noqa: F401 - host arrays jax uses in place


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


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
