"""Process-level speed settings: the host allocator and the compilation cache.

The convolutions themselves are ``vgg_flax.onednn``'s. What is here is what a plain ``jax.jit``
user would otherwise have to know about: ``tune_host_malloc`` is applied by ``import vgg_flax``
(opt out with ``VGG_FLAX_MALLOC=default``), and ``enable_compilation_cache`` is a one-line
opt-in. ``docs/performance.md`` has the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from pathlib import Path

import jax

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def tune_host_malloc() -> str:
    """Serve large host blocks from one heap that is never trimmed; returns what was done.

    glibc's malloc serves every block over 32 MiB with a fresh mmap and returns it on free, so
    each execution of a compiled VGG step (XLA allocates its temporaries, ~1 GB for a VGG-16
    fp32 training step at batch 8, from a worker thread) and each large torch tensor
    page-faults its memory in again: 237,000 faults and 0.5-4 s of kernel time per step on the
    2-core machine we measure on. With mmap off for malloc, trimming off and one arena, freed
    memory stays with the process for reuse (its resident size does not shrink after a peak).

    glibc reads these through ``mallopt`` at any time, but a thread keeps the arena it was
    given at its first allocation, and in a thread's own arena glibc still maps blocks over 64
    MiB with mmap. So this must run before JAX starts its backend (and with it XLA's worker
    threads): ``import vgg_flax`` calls it. Imported after JAX has run something, it still
    applies to the threads to come (and torch's), and the returned string says so. Nothing is
    changed off glibc or with ``VGG_FLAX_MALLOC=default`` in the environment.
    """
    if os.environ.get("VGG_FLAX_MALLOC", "").lower() == "default":
        return "default (VGG_FLAX_MALLOC=default)"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    from vgg_flax import jax_internals  # JAX has no public way to ask
    late = (jax_internals.backends_are_initialized()
            if not jax_internals.probe("backends_initialized") else None)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # -1 turns trimming off entirely (mallopt(3)); 0 mmaps: large blocks come from the heap.
    done = [libc.mallopt(p, v) for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                                             (_M_ARENA_MAX, 1))]
    if not all(done):
        return "default (mallopt refused)"
    if late is None:
        return "tuned (whether JAX had started first is unknown: jax_internals.report())"
    return ("tuned late (JAX ran before import vgg_flax: XLA's worker threads keep glibc's "
            "defaults; import vgg_flax before running JAX)" if late else "tuned")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep compiled programs on disk so a second process skips XLA compilation.

    Default directory: ``$VGG_FLAX_CACHE/xla`` or ``~/.cache/vgg_flax/xla``. Programs over
    several devices that hold oneDNN convolutions are compiled again in each process: JAX keys
    their batch partitioning (``custom_partitioning``) by a per-process pointer. With
    ``jax_remove_custom_partitioning_ptr_from_cache_key`` set, such convolutions run on XLA's
    instead, with a warning: the geometry lives behind that pointer, and two convolutions that
    differ only in padding shared one cache entry (measured: wrong results).
    """
    root = os.environ.get("VGG_FLAX_CACHE")
    path = Path(path or (Path(root) / "xla" if root else Path.home() / ".cache/vgg_flax/xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # VGG programs compile in seconds: cache all of them, not only the slow ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
