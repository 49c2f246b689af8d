"""Process-level speed settings: the host allocator and the compilation cache.

The convolutions themselves are ``vgg_flax.onednn``'s. What is here is what a plain ``jax.jit``
user would otherwise have to know about: ``tune_host_malloc`` is applied by ``import vgg_flax``
where JAX will compute on the CPU (``VGG_FLAX_MALLOC=default`` opts out, ``=tuned`` forces it),
and ``enable_compilation_cache`` is a one-line opt-in. ``docs/performance.md`` has the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from pathlib import Path

import jax

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_ENV = "VGG_FLAX_MALLOC"  # "default": never tune; "tuned": always; unset: on CPU only


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module in sys.modules without a spec: not a plugin
        return None


def accelerator_plugins() -> list[str]:
    """The accelerator backends JAX would find when it starts, found as JAX's backend discovery
    (its xla_bridge module) finds them, with public APIs only: modules of the ``jax_plugins``
    namespace package (CUDA's and ROCm's plugins install ``jax_plugins.xla_cuda12`` and the
    like), plugins named in ``PJRT_NAMES_AND_LIBRARY_PATHS``, TPUs' ``libtpu`` (or
    ``TPU_LIBRARY_PATH``), and ``jax_plugins`` entry points (read last: scanning every
    installed distribution takes ~70 ms). Nothing is imported or started."""
    found = []
    spec = _find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found += [f"jax_plugins.{m.name}" for m in
                  pkgutil.iter_modules(list(spec.submodule_search_locations))]
    found += [f"{entry.split(os.pathsep)[0]} (PJRT_NAMES_AND_LIBRARY_PATHS)" for entry in
              os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS", "").split(",") if entry.strip()]
    if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        found.append("TPU_LIBRARY_PATH")
    if _find_spec("libtpu") is not None:
        found.append("libtpu")
    if not found:
        found += [ep.value for ep in importlib.metadata.entry_points(group="jax_plugins")]
    return sorted(set(found))


def where_jax_computes(platforms: str | None = None) -> tuple[str, str]:
    """(platform, why): where JAX will run programs by default, known without starting it.

    ``platforms`` is JAX_PLATFORMS's value (default: JAX's ``jax_platforms`` config, which
    reads it): its first entry is JAX's default backend. Without it, JAX picks an accelerator
    over the CPU whenever one initialises, so any installed accelerator plugin counts as one
    (on a host without the device JAX then falls back to the CPU: set JAX_PLATFORMS=cpu).
    Returns ("cpu", ...) or the accelerator's platform ("cuda", "tpu", "accelerator"...).
    """
    if platforms is None:
        platforms = jax.config.jax_platforms or ""
    if platforms.strip():
        first = platforms.split(",")[0].strip().lower()
        return first, f"JAX_PLATFORMS={platforms}"
    plugins = accelerator_plugins()
    if plugins:
        return "accelerator", (f"accelerator plugin {', '.join(plugins)} installed, "
                               "JAX_PLATFORMS unset")
    return "cpu", "no accelerator plugin installed"


@functools.cache
def tune_host_malloc() -> str:
    """Serve large host blocks from one heap that is never trimmed, where JAX computes on the
    CPU; returns what was done and why ("tuned (...)", "default (...)").

    glibc's malloc serves every block over 32 MiB with a fresh mmap and returns it on free, so
    each execution of a compiled VGG step (XLA allocates its temporaries, ~1 GB for a VGG-16
    fp32 training step at batch 8, from a worker thread) and each large torch tensor
    page-faults its memory in again: 237,000 faults and 0.5-4 s of kernel time per step on the
    2-core machine we measure on. With mmap off for malloc, trimming off and one arena, freed
    memory stays with the process for reuse (its resident size does not shrink after a peak).

    On a GPU or TPU host the temporaries live on the device: the change buys nothing there and
    puts every input thread's allocations on one arena, so it is made only where JAX will
    compute on the CPU (``where_jax_computes``). ``VGG_FLAX_MALLOC=tuned`` makes it anyway
    (e.g. a CUDA plugin installed on a host without a GPU), ``VGG_FLAX_MALLOC=default`` never.

    glibc reads these through ``mallopt`` at any time, but a thread keeps the arena it was
    given at its first allocation, and in a thread's own arena glibc still maps blocks over 64
    MiB with mmap. So this must run before JAX starts its backend (and with it XLA's worker
    threads), which is why it cannot ask JAX for the backend: ``import vgg_flax`` calls it.
    Imported after JAX has run something, it asks JAX's default backend and, on CPU, still
    applies to the threads to come (and torch's); the returned string says so. Nothing is
    changed off glibc.
    """
    choice = os.environ.get(MALLOC_ENV, "").strip().lower()
    if choice == "default":
        return f"default ({MALLOC_ENV}=default)"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    from vgg_flax import jax_internals  # JAX has no public way to ask
    late = (jax_internals.backends_are_initialized()
            if not jax_internals.probe("backends_initialized") else None)
    if choice == "tuned":
        why = f"{MALLOC_ENV}=tuned"
    else:
        if late:  # started already: JAX can be asked at no cost
            where = jax.default_backend()
            why = f"JAX's default backend is {where}"
        else:
            where, why = where_jax_computes()
        if where != "cpu":
            return (f"default ({why}: JAX computes off the CPU, where the tuning buys "
                    f"nothing; {MALLOC_ENV}=tuned tunes it anyway)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # -1 turns trimming off entirely (mallopt(3)); 0 mmaps: large blocks come from the heap.
    done = [libc.mallopt(p, v) for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                                             (_M_ARENA_MAX, 1))]
    if not all(done):
        return "default (mallopt refused)"
    if late is None:
        return (f"tuned ({why}; whether JAX had started first is unknown: "
                "jax_internals.report())")
    return (f"tuned late ({why}; JAX ran before import vgg_flax: XLA's worker threads keep "
            "glibc's defaults; import vgg_flax before running JAX)" if late else f"tuned ({why})")


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
