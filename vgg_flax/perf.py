"""Speed settings the library can apply safely: per-executable XLA options, compilation cache.

Nothing here is global: ``compiler_options()`` goes to ``jax.jit(..., compiler_options=...)``
of the functions that run a VGG, so other programs in the same process keep XLA's defaults.
An option is kept only where ``benchmarks/bench.py --levers`` shows it helps (README,
"Performance"), and the parity tests run with whatever is kept, at the same tolerance.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

# XLA:CPU hands convolutions and dots to YNNPACK; letting it also take the element-wise
# epilogue (bias add, ReLU, BatchNorm's multiply-add) fuses them into the convolution instead
# of a second pass over every activation.
_YNN_EPILOGUE = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "ELTWISE"))}


def levers(backend: str | None = None) -> dict[str, dict[str, Any]]:
    """Each candidate compiler setting on its own, by name (for ``bench.py --levers``)."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {"+ynn epilogue fusion": dict(_YNN_EPILOGUE),
            "+onednn": {"xla_cpu_use_onednn": True}}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """The XLA options vgg_flax compiles its VGGs with on ``backend`` (default: JAX's).

    None (XLA's defaults) until a lever is measured to help: see README, "Performance".
    """
    del backend
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
