"""VGG's convolutions on CPU through oneDNN, called from the compiled XLA program.

XLA:CPU runs convolutions on Eigen's float32 kernels and has no bfloat16 convolution (it
converts bf16 operands to f32 first); torch runs the same convolutions on oneDNN, which uses
AVX-512 (and AVX-512 BF16 where the CPU has it). ``vgg_flax/csrc/onednn_conv.cc``, built when
vgg_flax is installed, exposes oneDNN's forward, backward-data and backward-weights convolutions
as XLA FFI custom calls; this module registers them and wraps them as a differentiable,
shardable ``conv_general_dilated`` for ``flax.linen.Conv``. README, "Performance", has the
figures; ``benchmarks/layers.py`` times each VGG-16 convolution both ways.

What it takes: 2-D convolutions, NHWC activations and HWIO kernels (Flax's layouts), float32 or
bfloat16 operands of one dtype, any stride, non-negative padding and kernel dilation, no input
dilation or feature groups. Anything else goes to ``lax.conv_general_dilated`` unchanged.
Reverse-mode derivatives only (``jax.grad``, ``jax.vjp``); forward-mode (``jax.jvp``,
``jax.jacfwd``) and second derivatives need XLA's convolution: build the model with
``VGG_FLAX_CONV=xla`` in the environment (read each time a VGG is traced), as on non-x86
CPUs, where the extension is not built.

Sharding: the batch dimension partitions (data parallel, FSDP); every other dimension is
gathered. The weight gradient of a batch-sharded convolution is summed across the batch shards
inside the partitioned program, as XLA does for its own convolutions.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
from typing import Sequence

import jax
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

_TARGETS = {"vgg_flax_conv_fwd": "VggFlaxConvFwd",
            "vgg_flax_conv_bwd_data": "VggFlaxConvBwdData",
            "vgg_flax_conv_bwd_weights": "VggFlaxConvBwdWeights"}
_NHWC = ("NHWC", "HWIO", "NHWC")


def _preload_libdnnl() -> None:
    # The onednn-cpu-gomp wheel puts libdnnl.so.3 in <prefix>/lib, which is on no library path:
    # load it first, globally, so the extension's dependency on it resolves by soname.
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return  # a system oneDNN, if the extension was built against one
    for f in files:
        if f.name == "libdnnl.so.3":
            ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            return


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the extension, "") once registered with XLA, or (None, why not)."""
    spec = importlib.util.find_spec("vgg_flax._onednn_conv")
    if spec is None or not spec.origin:
        return None, ("vgg_flax's oneDNN extension is not built (it is built by `pip install` on "
                      "x86-64 Linux with a C++17 compiler; reinstall to build it)")
    try:
        _preload_libdnnl()
        lib = ctypes.CDLL(spec.origin)
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError, ValueError) as e:
        return None, f"vgg_flax's oneDNN extension did not load: {e}"
    lib.VggFlaxOnednnVersion.restype = ctypes.c_char_p
    return lib, ""


def _opted_out() -> bool:
    return os.environ.get("VGG_FLAX_CONV", "").lower() == "xla"


def available() -> bool:
    """Whether VGGs traced now run oneDNN convolutions: built, loaded, registered with XLA:CPU,
    and not turned off with ``VGG_FLAX_CONV=xla``."""
    return not _opted_out() and _load()[0] is not None


def why_unavailable() -> str:
    """One line saying why :func:`available` is False ("" when it is True)."""
    return "VGG_FLAX_CONV=xla is set" if _opted_out() else _load()[1]


def version() -> str | None:
    """The oneDNN version the extension runs, e.g. "3.2.0"; None when not available."""
    lib = _load()[0]
    return lib.VggFlaxOnednnVersion().decode() if lib is not None else None


# ---- the three custom calls, each partitioned along the batch -------------------------------

def _ffi(target, out, a, b, geometry):
    strides, padding, dilation = geometry
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        a, b, strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in padding for p in pair], np.int64),
        dilation=np.asarray(dilation, np.int64))


def _batch_axes(sharding):
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _axis_names(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _partitioned(target: str, rule: str, out_of, *, batch_reduced: bool = False):
    """A custom call that runs on each device's slice of the batch.

    ``out_of(a, b, geometry)`` gives the result's ShapeDtypeStruct. With ``batch_reduced`` the
    result has no batch dimension (the weight gradient): each device computes the sum over its
    own slice and the slices' results are summed across the batch axes.
    """

    @functools.partial(custom_partitioning, static_argnums=(2,))
    def op(a, b, geometry):
        return _ffi(target, out_of(a, b, geometry), a, b, geometry)

    def partition(geometry, mesh, arg_shapes, result_shape):
        axes = _batch_axes(arg_shapes[0].sharding)
        batch = NamedSharding(mesh, P(axes, None, None, None))
        replicated = NamedSharding(mesh, P())
        if batch_reduced:
            arg_shardings = (batch, batch)
            names = _axis_names(axes)

            def lower(a, b):
                y = _ffi(target, out_of(a, b, geometry), a, b, geometry)
                return lax.psum(y, names) if names else y
            return mesh, lower, replicated, arg_shardings
        # the second operand is the kernel: every device needs all of it
        return (mesh, lambda a, b: _ffi(target, out_of(a, b, geometry), a, b, geometry),
                batch, (batch, replicated))

    def infer(geometry, mesh, arg_shapes, result_shape):
        if batch_reduced:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding), None, None, None))

    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     propagate_user_sharding=None, sharding_rule=rule,
                     **({"reduction_factors": ("n",)} if batch_reduced else {}),
                     need_replication_factors=tuple(dict.fromkeys(
                         f for f in rule.replace(",", " ").replace("->", " ").split()
                         if f != "n")))
    return op


def _out_hw(h, k, stride, pad, dilation):
    return (h + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def _fwd_out(x, w, geometry):
    strides, padding, dilation = geometry
    hw = [_out_hw(x.shape[1 + i], w.shape[i], strides[i], padding[i], dilation[i])
          for i in range(2)]
    return jax.ShapeDtypeStruct((x.shape[0], *hw, w.shape[3]), x.dtype)


def _x_shape_from(x_hw):
    # bwd data's result shape is not a function of (dy, w) alone: it rides in the geometry.
    return lambda dy, w, geometry: jax.ShapeDtypeStruct((dy.shape[0], *x_hw, w.shape[2]),
                                                        dy.dtype)


def _batched(op, geometry, *, merge_batch: bool):
    """``op(a, b, geometry)`` with a vmap rule (custom_partitioning has none).

    Mapped over the first operand only, the mapped axis folds into the batch: one call on
    (B * N, ...). Otherwise (a mapped kernel, or the weight gradient, which must stay per
    example) one call per mapped element, in sequence.
    """
    @jax.custom_batching.custom_vmap
    def f(a, b):
        return op(a, b, geometry)

    @f.def_vmap
    def rule(axis_size, in_batched, a, b):
        if merge_batch and in_batched == [True, False]:
            y = f(a.reshape(-1, *a.shape[2:]), b)
            return y.reshape(axis_size, -1, *y.shape[1:]), True
        a = a if in_batched[0] else jax.numpy.broadcast_to(a, (axis_size, *a.shape))
        b = b if in_batched[1] else jax.numpy.broadcast_to(b, (axis_size, *b.shape))
        return lax.map(lambda ab: f(*ab), (a, b)), True

    return f


_fwd_op = _partitioned("vgg_flax_conv_fwd", "n h w c, i j c o -> n p q o", _fwd_out)


@functools.cache
def _conv_fwd(geometry):
    return _batched(_fwd_op, geometry, merge_batch=True)


@functools.cache
def _conv_bwd_data(geometry, x_hw: tuple[int, int]):
    op = _partitioned("vgg_flax_conv_bwd_data", "n p q o, i j c o -> n h w c",
                      _x_shape_from(x_hw))
    return _batched(op, geometry, merge_batch=True)


@functools.cache
def _conv_bwd_weights(geometry, w_shape: tuple[int, ...]):
    out = lambda x, dy, geometry: jax.ShapeDtypeStruct(w_shape, x.dtype)  # noqa: E731
    op = _partitioned("vgg_flax_conv_bwd_weights", "n h w c, n p q o -> i j c o", out,
                      batch_reduced=True)
    return _batched(op, geometry, merge_batch=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, w, geometry):
    """oneDNN convolution of NHWC ``x`` with HWIO ``w``; ``geometry`` = (strides, padding
    pairs, kernel dilation) as tuples. Call :func:`conv_general_dilated` instead unless you
    have checked :func:`supports` yourself."""
    return _conv_fwd(geometry)(x, w)


def _conv_vjp_fwd(x, w, geometry):
    return _conv_fwd(geometry)(x, w), (x, w)


def _conv_vjp_bwd(geometry, res, dy):
    x, w = res
    dx = _conv_bwd_data(geometry, tuple(x.shape[1:3]))(dy, w)
    dw = _conv_bwd_weights(geometry, tuple(w.shape))(x, dy)
    return dx, dw


conv.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def supports(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, preferred_element_type=None,
             **unknown) -> tuple | None:
    """The geometry :func:`conv` needs when it can run this convolution, else None."""
    if unknown or feature_group_count != 1 or lhs.ndim != 4 or rhs.ndim != 4:
        return None
    if not (lhs.dtype == rhs.dtype and lhs.dtype in (np.float32, jax.numpy.bfloat16)):
        return None
    if preferred_element_type is not None and preferred_element_type != lhs.dtype:
        return None
    if dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return None
    if tuple(lhs_dilation or (1, 1)) != (1, 1):
        return None
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        k = [(rhs.shape[i] - 1) * dilation[i] + 1 for i in range(2)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], k, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in padding for p in pair) or min(dilation) < 1:
        return None
    if any(_out_hw(lhs.shape[1 + i], rhs.shape[i], strides[i], padding[i], dilation[i]) < 1
           for i in range(2)):
        return None
    return strides, padding, dilation


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, **unknown):
    """``lax.conv_general_dilated`` on oneDNN where :func:`supports` says it can, else lax's own.

    ``precision`` is moot on oneDNN: float32 convolutions accumulate in float32 (as
    ``Precision.HIGHEST``), bfloat16 ones in float32 and round once.
    """
    geometry = supports(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, preferred_element_type,
                        **unknown)
    if geometry is not None and available():
        return conv(lhs, rhs, geometry)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type, **unknown)

