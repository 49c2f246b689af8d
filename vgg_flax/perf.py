"""Speed settings the library can apply safely: per-executable XLA options, compilation cache.

Nothing here is global: ``compiler_options()`` goes to ``jax.jit(..., compiler_options=...)``
of the functions that run a VGG, so other programs in the same process keep XLA's defaults.
An option is kept only where ``benchmarks/bench.py --levers`` shows it helps (README,
"Performance"), and the parity tests run with whatever is kept, at the same tolerance.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax


def _ynn(*kinds: str) -> dict[str, str]:
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)}


# jaxlib 0.10's XLA:CPU hands convolutions *and* dots to YNNPACK, fusing the whole VGG stack
# into one YNNPACK subgraph. Keeping YNNPACK for dots only sends the convolutions to XLA's own
# (Eigen) convolution kernels instead.
_YNN_DOTS_ONLY = _ynn("INDIVIDUAL_DOT")
# Also give YNNPACK the element-wise epilogues (bias, ReLU) of what it runs.
_YNN_EPILOGUE = _ynn("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "ELTWISE")


def levers(backend: str | None = None) -> dict[str, dict[str, Any]]:
    """Each candidate compiler setting on its own, by name (for ``bench.py --levers``)."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {"convs to Eigen (YNNPACK dots only)": dict(_YNN_DOTS_ONLY),
            "+YNNPACK epilogue fusion": dict(_YNN_EPILOGUE),
            "+oneDNN": {"xla_cpu_use_onednn": True}}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """The XLA options vgg_flax compiles its VGGs with on ``backend`` (default: JAX's).

    On CPU: convolutions on XLA's own kernels rather than YNNPACK. VGG-16 at batch 8 on the
    2-core Zen 5 we measure on (README, "Performance"): fp32 inference 4.4 -> 9.8 img/s, fp32
    training step 1.4 -> 2.3, bf16 inference 6.7 -> 8.1, bf16 training step 1.1 -> 1.9. None
    (XLA's defaults) elsewhere. Use as ``jax.jit(fn, compiler_options=vgg_flax.perf.compiler_options())``.
    """
    if (backend or jax.default_backend()) == "cpu":
        return dict(_YNN_DOTS_ONLY)
    return None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep compiled programs on disk so a second process skips XLA compilation.

    Default directory: ``$VGG_FLAX_CACHE`` or ``~/.cache/vgg_flax/xla``.
    """
    path = Path(path or os.environ.get("VGG_FLAX_CACHE", Path.home() / ".cache/vgg_flax/xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # VGG programs compile in seconds: cache all of them, not only the slow ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# glibc's malloc serves every block over 32 MiB with a fresh mmap and returns it on free, so each
# execution of a compiled VGG step (one large temporary arena) and each large torch tensor
# page-faults its memory in again: 1.55 million faults and ~11 s of kernel time per VGG-16 fp32
# training step at batch 32 on the 2-core machine we measure on. Serving them from one heap that
# is never trimmed removes the faults; memory freed stays with the process for reuse.
HOST_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                   "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def host_malloc_tuned() -> bool:
    """Whether this process started with ``HOST_MALLOC_ENV``."""
    return all(os.environ.get(k) == v for k, v in HOST_MALLOC_ENV.items())


def exec_with_tuned_host_malloc() -> None:
    """Restart the running command line (same PID) with ``HOST_MALLOC_ENV`` set.

    glibc reads these settings only at start-up, so a command-line tool calls this first thing,
    before doing any work (what it imported before is discarded with the process). Nothing happens when they are already set, off glibc, or with
    ``VGG_FLAX_MALLOC=default`` in the environment. Never call it from a library or a test process:
    it replaces the process.
    """
    if (host_malloc_tuned() or os.environ.get("VGG_FLAX_MALLOC") == "default"
            or sys.platform != "linux" or platform.libc_ver()[0] != "glibc"):
        return
    os.environ.update(HOST_MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
