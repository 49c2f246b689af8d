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


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv3x3_taps(x, w):
    # y = sum over the nine taps of shift(x) @ w[i, j], as bf16 x bf16 -> f32 matmuls.
    n, h, wd, c = x.shape
    xp = jax.numpy.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    acc = None
    for i in range(3):
        for j in range(3):
            d = jax.numpy.dot(xp[:, i:i + h, j:j + wd, :].reshape(-1, c), w[i, j],
                              preferred_element_type=jax.numpy.float32)
            acc = d if acc is None else acc + d
    return acc.astype(x.dtype).reshape(n, h, wd, -1)


def _conv3x3(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def conv3x3_bf16_matmuls(x, w):
    """A 3x3, stride 1, pad 1 NHWC convolution of bf16 operands as nine matmuls.

    XLA:CPU has no bf16 convolution (it converts to f32 and runs the f32 kernel), but it runs
    bf16 x bf16 -> f32 matmuls natively. The gradient is XLA's own convolution gradient: written
    as matmuls too it was slower (shifted-slice transposes), README "Performance".
    """
    return _conv3x3_taps(x, w)


def _taps_fwd(x, w):
    return _conv3x3_taps(x, w), (x, w)


def _taps_bwd(res, g):
    return jax.vjp(_conv3x3, *res)[1](g)


conv3x3_bf16_matmuls.defvjp(_taps_fwd, _taps_bwd)

# Measured per layer (benchmarks/layers.py shapes, batch 8): the nine matmuls beat XLA's
# convolution from 112x112 maps down and with at least 64 input channels; on 224x224 maps
# building the shifted operands costs more than the matmuls save.
_TAPS_MAX_HW, _TAPS_MIN_CIN = 112, 64


def cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             precision=None, **kwargs):
    """``lax.conv_general_dilated`` that sends VGG's bf16 3x3 convolutions to the matmul form.

    For ``flax.linen.Conv(conv_general_dilated=...)``. Everything else (other dtypes, strides,
    dilations, kernel sizes, small channel counts, 224x224 maps) goes to ``lax`` unchanged.
    """
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if (lhs.dtype == rhs.dtype == jax.numpy.bfloat16 and rhs.shape[:2] == (3, 3)
            and tuple(window_strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and feature_group_count == 1 and not kwargs and dimension_numbers == nhwc
            and max(lhs.shape[1:3]) <= _TAPS_MAX_HW and lhs.shape[3] >= _TAPS_MIN_CIN):
        return conv3x3_bf16_matmuls(lhs, rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)


def conv_general_dilated(backend: str | None = None):
    """The convolution vgg_flax's modules use on ``backend``: None means ``lax``'s own.

    On CPU: oneDNN's convolutions (``vgg_flax.onednn``) where the extension is built, else
    XLA's, with bf16 3x3 convolutions as matmuls (``cpu_conv_general_dilated``).
    """
    if (backend or jax.default_backend()) == "cpu":
        from vgg_flax import onednn  # noqa: PLC0415 - loads the extension on first use only
        return onednn.conv_general_dilated if onednn.available() else cpu_conv_general_dilated
    return None


def conv_bias(x, w, b, padding, dilation=(1, 1), precision=None):
    """A stride-1 NHWC x HWIO convolution plus bias: what every VGG convolution layer computes.

    On CPU with ``vgg_flax.onednn`` built, one oneDNN call that adds the bias as it writes the
    output, and whose gradient sums the bias gradient while it reads the output gradient for the
    weight gradient (XLA:CPU spent 400 ms of a 2 s bf16 VGG-16 training step at batch 8 on those
    sums alone, as windowed reductions). Elsewhere ``conv_general_dilated()``'s convolution + b.
    """
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
    if jax.default_backend() == "cpu" and b.dtype in (jax.numpy.float32, jax.numpy.bfloat16):
        from vgg_flax import onednn  # noqa: PLC0415
        geometry = onednn.supports(x, w, (1, 1), padding, rhs_dilation=dilation,
                                   dimension_numbers=dn)
        if geometry is not None and onednn.available():
            return onednn.conv(x, w, geometry, bias=b)
    conv = conv_general_dilated() or jax.lax.conv_general_dilated
    y = conv(x, w, (1, 1), padding, rhs_dilation=dilation, dimension_numbers=dn,
             precision=precision)
    return y + b


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
