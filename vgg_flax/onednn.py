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

import jax
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

_TARGETS = {"vgg_flax_conv_fwd": "VggFlaxConvFwd",
            "vgg_flax_conv_bias_fwd": "VggFlaxConvBiasFwd",
            "vgg_flax_conv_bwd_data": "VggFlaxConvBwdData",
            "vgg_flax_conv_bwd_weights": "VggFlaxConvBwdWeights",
            "vgg_flax_conv_bwd_weights_bias": "VggFlaxConvBwdWeightsBias"}
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


@functools.cache
def _cpu_supports(dtype_name: str) -> bool:
    # bf16 convolutions need AVX-512 (or newer) in oneDNN; older x86 CPUs get XLA's.
    return bool(_load()[0].VggFlaxOnednnSupports(int(dtype_name == "bfloat16")))


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


# ---- the custom calls, each partitioned along the batch and batched under vmap ------------

def _ffi(target, out, operands, geometry):
    strides, padding, dilation = geometry
    # no vmap_method: _op's custom_vmap rule batches these calls, so none reaches vmap bare
    return jax.ffi.ffi_call(target, out)(
        *operands, strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in padding for p in pair], np.int64),
        dilation=np.asarray(dilation, np.int64))


def _batch_spec(sharding):
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _axis_names(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _op(target: str, rule: str, out, geometry, *, weight_gradient: bool = False):
    """The custom call ``target`` as a function of its operands, for one geometry.

    ``rule`` names each dimension (Shardy's notation); ``n`` is the batch. Sharded, every device
    runs the call on its slice of the batch with the kernel (and bias) whole. A weight gradient
    (``weight_gradient``) has no batch dimension: each device sums over its own slice, then the
    slices' sums are added across the batch axes (an all-reduce). Under ``jax.vmap`` a mapped
    axis of the first operand alone folds into the batch (one call); anything else (mapped
    kernels, per-example weight gradients) is one call per mapped element, in sequence.
    """
    n_operands = rule.split("->")[0].count(",") + 1
    factors = rule.replace(",", " ").replace("->", " ").split()

    def call(*operands):
        # called on global shapes, and on each device's slice when partitioned
        local = out if weight_gradient else _sds((operands[0].shape[0], *out.shape[1:]),
                                                 out.dtype)
        return _ffi(target, local, operands, geometry)

    op = custom_partitioning(call)

    def shardings(mesh, arg_shapes):
        axes = _batch_spec(arg_shapes[0].sharding)
        batch = NamedSharding(mesh, P(axes, None, None, None))
        replicated = NamedSharding(mesh, P())
        return axes, batch, replicated

    def partition(mesh, arg_shapes, result_shape):
        axes, batch, replicated = shardings(mesh, arg_shapes)
        if weight_gradient:  # (x, dy) -> dw[, db], summed over the batch shards
            names = _axis_names(axes)

            def lower(*operands):
                grads = call(*operands)
                return jax.tree.map(lambda g: lax.psum(g, names), grads) if names else grads
            return (mesh, lower, jax.tree.map(lambda _: replicated, out),
                    (batch,) * n_operands)
        # (x or dy, w[, b]): the batch stays split, the kernel and bias are whole everywhere
        return mesh, call, batch, (batch,) + (replicated,) * (n_operands - 1)

    def infer(mesh, arg_shapes, result_shape):
        _, batch, replicated = shardings(mesh, arg_shapes)
        return jax.tree.map(lambda _: replicated, out) if weight_gradient else batch

    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     propagate_user_sharding=None, sharding_rule=rule,
                     **({"reduction_factors": ("n",)} if weight_gradient else {}),
                     need_replication_factors=tuple(dict.fromkeys(f for f in factors
                                                                  if f != "n")))

    @jax.custom_batching.custom_vmap
    def batched(*operands):
        return op(*operands)

    @batched.def_vmap
    def vmap_rule(axis_size, in_batched, *operands):
        out_batched = jax.tree.map(lambda _: True, out)
        if not weight_gradient and in_batched[0] and not any(in_batched[1:]):
            a = operands[0]  # (mapped, N, ...) -> (mapped * N, ...): ``call`` follows N
            y = op(a.reshape(-1, *a.shape[2:]), *operands[1:])
            return y.reshape(axis_size, *out.shape), out_batched
        operands = tuple(o if b else jax.numpy.broadcast_to(o, (axis_size, *o.shape))
                         for o, b in zip(operands, in_batched))
        return lax.map(lambda ops: batched(*ops), operands), out_batched

    return batched


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _out_hw(h, k, stride, pad, dilation):
    return (h + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def _y_shape(x, w, geometry):
    strides, padding, dilation = geometry
    return (x.shape[0], *[_out_hw(x.shape[1 + i], w.shape[i], strides[i], padding[i],
                                  dilation[i]) for i in range(2)], w.shape[3])


def _forward(x, w, b, geometry):
    out = _sds(_y_shape(x, w, geometry), x.dtype)
    if b is None:
        return _op("vgg_flax_conv_fwd", "n h w c, i j c o -> n p q o", out, geometry)(x, w)
    return _op("vgg_flax_conv_bias_fwd", "n h w c, i j c o, o -> n p q o", out, geometry)(x, w, b)


def _backward(x, w, b, dy, geometry):
    dx = _op("vgg_flax_conv_bwd_data", "n p q o, i j c o -> n h w c", _sds(x.shape, x.dtype),
             geometry)(dy, w)
    if b is None:
        dw = _op("vgg_flax_conv_bwd_weights", "n h w c, n p q o -> i j c o",
                 _sds(w.shape, w.dtype), geometry, weight_gradient=True)(x, dy)
        return dx, dw, None
    dw, db = _op("vgg_flax_conv_bwd_weights_bias", "n h w c, n p q o -> i j c o, o",
                 (_sds(w.shape, w.dtype), _sds(b.shape, b.dtype)), geometry,
                 weight_gradient=True)(x, dy)
    return dx, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, w, b, geometry):
    return _forward(x, w, b, geometry)


def _conv_vjp_fwd(x, w, b, geometry):
    return _forward(x, w, b, geometry), (x, w, b)


def _conv_vjp_bwd(geometry, res, dy):
    return _backward(*res, dy, geometry)


_conv.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def conv(x, w, geometry, bias=None):
    """oneDNN convolution of NHWC ``x`` with HWIO ``w``, plus ``bias`` (one value per output
    channel, folded into oneDNN's forward and weight-gradient passes) when given;
    ``geometry`` = (strides, padding pairs, kernel dilation) as tuples, from :func:`supports`."""
    return _conv(x, w, bias, geometry)


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
    if available() and not _cpu_supports(np.dtype(lhs.dtype).name):
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

