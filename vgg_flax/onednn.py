"""VGG's convolution as a JAX primitive: oneDNN kernels on CPU, XLA's convolution elsewhere.

XLA:CPU runs convolutions on Eigen's float32 kernels and has no bfloat16 convolution; torch runs
the same convolutions on oneDNN. ``vgg_flax/csrc/onednn_conv.cc``, built when vgg_flax is
installed on x86-64 Linux, exposes oneDNN's forward, backward-data and backward-weights
convolutions as XLA FFI custom calls. This module makes them compose with every JAX
transformation the way ``lax.conv_general_dilated`` does, as three primitives:

    conv_p          y = relu?(conv(x, w) + b)
    bwd_data_p      dx = conv_backward_data(dy, w)        (the transpose of conv in x)
    bwd_weights_p   dw[, db] = conv_backward_weights(x, dy)  (the transpose of conv in w[, b])

Each is bilinear in its two array operands, so its JVP is two calls of the family and its
transposes are the other two members: ``jax.grad``, ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``,
HVPs, ``jax.linearize``, ``jax.vmap`` and ``jax.checkpoint`` work at any order. Sharding: the
batch partitions (data parallel, FSDP), every other dimension is gathered, and a weight gradient
is summed across the batch shards inside the partitioned program, as XLA does for its own.

Where each runs is decided when the program is lowered, per platform, like any lax primitive:
on CPU, oneDNN when the extension is built and the CPU has kernels for the dtype (bf16 needs
AVX-512), else XLA's convolution; on GPU/TPU always XLA's. ``impl="onednn"`` makes the oneDNN
path a requirement (an error instead of a fallback); ``impl="xla"`` never binds these primitives.

Operands: NHWC activations (float32 or bfloat16), HWIO kernels and a bias in float32 or
bfloat16. Kernel and bias may be float32 under bfloat16 activations: the kernel is rounded to
the activations' dtype while oneDNN reorders it into its blocked layout (no separate cast pass),
the bias is added in float32 before the output's one rounding, and their gradients come back in
their own dtypes.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import types
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vgg_flax import jax_internals, onednn_sharding

IMPLS = ("auto", "onednn", "xla")
_TARGETS = {"vgg_flax_conv_fwd": "VggFlaxConvFwd",
            "vgg_flax_conv_bias_fwd": "VggFlaxConvBiasFwd",
            "vgg_flax_conv_bwd_data": "VggFlaxConvBwdData",
            "vgg_flax_conv_bwd_weights": "VggFlaxConvBwdWeights",
            "vgg_flax_conv_bwd_weights_bias": "VggFlaxConvBwdWeightsBias"}
_NHWC = ("NHWC", "HWIO", "NHWC")
_FLOATS = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


# ---- the extension ---------------------------------------------------------------------------

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
    """(the extension, "") once registered with XLA, or (None, why not). Called when a program
    is first lowered for CPU, never at import."""
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
    layout = os.environ.get("VGG_FLAX_ONEDNN_LAYOUT")
    if layout is not None and layout not in LAYOUTS:
        warnings.warn(f"vgg_flax: VGG_FLAX_ONEDNN_LAYOUT={layout!r} is not one of {LAYOUTS}; "
                      "using this CPU's default (unset it, or set nhwc or blocked)", stacklevel=2)
    return lib, ""


@functools.cache
def cpu_supports(dtype: Any) -> bool:
    """Whether this CPU has oneDNN kernels for ``dtype`` convolutions (bf16 needs AVX-512)."""
    lib = _load()[0]
    return lib is not None and bool(lib.VggFlaxOnednnSupports(
        int(np.dtype(dtype) == np.dtype(jnp.bfloat16))))


def available() -> bool:
    """Whether the extension is built, loads and is registered with XLA:CPU."""
    return _load()[0] is not None


def why_unavailable() -> str:
    """One line saying why :func:`available` is False ("" when it is True)."""
    return _load()[1]


def version() -> str | None:
    """The oneDNN version the extension runs, e.g. "3.2.0"; None when not available."""
    lib = _load()[0]
    return lib.VggFlaxOnednnVersion().decode() if lib is not None else None


LAYOUTS = ("nhwc", "blocked")


def backward_layout() -> str | None:
    """The activations' layout inside the backward convolutions: "nhwc" (as XLA passes them) or
    "blocked" (oneDNN's, reordered inside the call): the default on CPUs without AVX-512, whose
    NHWC backward kernels are oneDNN's slow ones. ``VGG_FLAX_ONEDNN_LAYOUT=nhwc|blocked``
    overrides it for the process. The forward is NHWC either way. None without the extension."""
    lib = _load()[0]
    return LAYOUTS[lib.VggFlaxOnednnBackwardLayout()] if lib is not None else None


# ---- geometry --------------------------------------------------------------------------------

def _out_hw(h, k, stride, pad, dilation):
    return (h + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def geometry(x_shape, w_shape, strides=(1, 1), padding: Any = "VALID", dilation=(1, 1)):
    """(strides, padding pairs, dilation) as hashable tuples of ints; padding may be a string."""
    dilation = tuple(int(d) for d in dilation)
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        k = [(w_shape[i] - 1) * dilation[i] + 1 for i in range(2)]
        padding = lax.padtype_to_pads(x_shape[1:3], k, strides, padding)
    return strides, tuple((int(lo), int(hi)) for lo, hi in padding), dilation


def _runs_on_onednn(x_dtype, geom) -> str:
    """"" when oneDNN can run this convolution, else why not."""
    strides, padding, dilation = geom
    if np.dtype(x_dtype) not in _FLOATS:
        return f"oneDNN convolutions take float32 or bfloat16 activations, not {np.dtype(x_dtype)}"
    if any(p < 0 for pair in padding for p in pair) or min(dilation) < 1 or min(strides) < 1:
        return "negative padding or non-positive strides/dilation"
    if not available():
        return why_unavailable()
    if not cpu_supports(x_dtype):
        return f"this CPU has no oneDNN kernels for {np.dtype(x_dtype)} convolutions"
    return ""


# ---- XLA's convolution: the other platforms, and CPUs without the extension -------------------

def _dn(x_shape, w_shape):
    return lax.conv_dimension_numbers(x_shape, w_shape, _NHWC)


@jax.custom_jvp
def torch_relu(y):
    """max(y, 0) as torch's ReLU: XLA's max keeps NaN, and the derivative is torch's
    threshold_backward (``_relu_mask``), not jnp.maximum's 0.5 at 0 and 0 * t elsewhere (NaN for
    an infinite t)."""
    return jnp.maximum(y, 0)


def _relu_mask(y, t):
    """The tangent ``t`` where ``y`` (the ReLU's input or output: same sign) is positive or NaN,
    0 where y <= 0: a NaN activation passes its gradient on, as in torch, instead of dropping it."""
    return lax.select(y <= 0, lax.full_like(t, 0), t)


torch_relu.defjvp(lambda primals, tangents: (torch_relu(primals[0]),
                                              _relu_mask(primals[0], tangents[0])))


def _lax_conv(x, w, b=None, *, geom, relu, precision, round_once=False):
    """XLA's convolution, as flax.linen.Conv runs it: the result, then the bias add, each rounded
    to ``x``'s dtype. ``round_once``: bias and ReLU in float32 and one rounding at the end, as
    oneDNN does (what the CPU fallback of ``conv_p`` runs: XLA:CPU convolves bfloat16 in float32
    anyway, so it costs nothing there, and ``conv_p`` means the same thing on every CPU)."""
    strides, padding, dilation = geom
    wide = jnp.float32 if round_once and x.dtype != jnp.float32 else None
    y = lax.conv_general_dilated(x, w.astype(x.dtype), strides, padding, rhs_dilation=dilation,
                                 dimension_numbers=_dn(x.shape, w.shape), precision=precision,
                                 preferred_element_type=wide)
    if b is not None:
        y = y + b.astype(y.dtype)
    y = torch_relu(y) if relu else y
    return y.astype(x.dtype)


def _lax_bwd_data(dy, w, *, geom, x_hw, precision):
    x = jax.ShapeDtypeStruct((dy.shape[0], *x_hw, w.shape[2]), dy.dtype)
    conv = functools.partial(_lax_conv, w=w, geom=geom, relu=False, precision=precision)
    return jax.linear_transpose(conv, x)(dy)[0]


def _lax_bwd_weights(x, dy, *, geom, w_shape, w_dtype, b_dtype, precision):
    w = jax.ShapeDtypeStruct(tuple(w_shape), x.dtype)
    conv = functools.partial(_lax_conv, x, geom=geom, relu=False, precision=precision)
    out = [jax.linear_transpose(conv, w)(dy)[0].astype(w_dtype)]
    if b_dtype is not None:
        out.append(dy.astype(jnp.float32).sum((0, 1, 2)).astype(b_dtype))
    return out


# ---- oneDNN through XLA FFI, partitioned along the batch ---------------------------------------

def _partitioned(target: str, rule: str, out, geom, **kw):
    """``target``'s custom call, sharded along the batch: ``onednn_sharding.partitioned``."""
    return onednn_sharding.partitioned(_api.custom_partitioning, target, rule, out, geom, **kw)


# Kernel and bias go in, and their gradients come out, in their own dtypes (the extension
# rounds the kernel while reordering it), and ReLU is applied as the output is written.
# float32 accumulation meets every ``precision`` (HIGHEST included).

def _onednn_conv(x, w, b=None, *, geom, relu, precision):
    del precision
    out = jax.ShapeDtypeStruct(_y_shape(x.shape, w.shape, geom), x.dtype)
    relu = np.int64(relu)
    if b is None:
        return _partitioned("vgg_flax_conv_fwd", "n h w c, i j c o -> n p q o", out, geom,
                            relu=relu)(x, w)
    return _partitioned("vgg_flax_conv_bias_fwd", "n h w c, i j c o, o -> n p q o", out, geom,
                        relu=relu)(x, w, b)


def _onednn_bwd_data(dy, w, *, geom, x_hw, precision):
    del precision
    out = jax.ShapeDtypeStruct((dy.shape[0], *x_hw, w.shape[2]), dy.dtype)
    return _partitioned("vgg_flax_conv_bwd_data", "n p q o, i j c o -> n h w c", out,
                        geom)(dy, w)


def _onednn_bwd_weights(x, dy, *, geom, w_shape, w_dtype, b_dtype, precision):
    del precision
    dw = jax.ShapeDtypeStruct(tuple(w_shape), w_dtype)
    if b_dtype is None:
        return [_partitioned("vgg_flax_conv_bwd_weights", "n h w c, n p q o -> i j c o", dw,
                             geom, weight_gradient=True)(x, dy)]
    db = jax.ShapeDtypeStruct((w_shape[3],), b_dtype)
    return list(_partitioned("vgg_flax_conv_bwd_weights_bias", "n h w c, n p q o -> i j c o, o",
                             (dw, db), geom, weight_gradient=True)(x, dy))


# ---- the primitives ----------------------------------------------------------------------------

# JAX's primitive machinery is not a stable API: vgg_flax.jax_internals reaches it. Where it is
# gone, the primitives are not defined (None) and every convolution runs on XLA's.
try:
    _api = types.SimpleNamespace(**jax_internals.primitive_api())
except (ImportError, AttributeError):  # jax_internals.probe("primitives") says what
    _api = None
conv_p = bwd_data_p = bwd_weights_p = None


def _y_shape(x_shape, w_shape, geom):
    strides, padding, dilation = geom
    return (x_shape[0], *[_out_hw(x_shape[1 + i], w_shape[i], strides[i], padding[i],
                                  dilation[i]) for i in range(2)], w_shape[3])


def _conv_abstract(x, w, *b, geom, relu, precision, strict):
    return _api.ShapedArray(_y_shape(x.shape, w.shape, geom), x.dtype)


def _bwd_data_abstract(dy, w, *, geom, x_hw, precision, strict):
    return _api.ShapedArray((dy.shape[0], *x_hw, w.shape[2]), dy.dtype)


def _bwd_weights_abstract(x, dy, *, geom, w_shape, w_dtype, b_dtype, precision, strict):
    out = [_api.ShapedArray(tuple(w_shape), w_dtype)]
    if b_dtype is not None:
        out.append(_api.ShapedArray((w_shape[3],), b_dtype))
    return out


def _eager(prim, *args, **params):
    return jax.jit(functools.partial(prim.bind, **params))(*args)


_SHARED_KEY_WHY = ("jax_remove_custom_partitioning_ptr_from_cache_key is set: oneDNN's batch "
                   "partitioning keeps the convolution's geometry behind that pointer, so two "
                   "convolutions could share a persistent cache entry; unset it to use oneDNN "
                   "on several devices")


def _partitioning_key_unsafe(ctx) -> bool:
    """Whether this convolution would be partitioned (several devices, not all manual) while
    JAX leaves the partitioner out of the persistent cache key: a cached program could then
    run another geometry's convolution (measured: two paddings, one entry, wrong results)."""
    if not jax.config.jax_remove_custom_partitioning_ptr_from_cache_key:
        return False
    context = jax_internals.axis_context(ctx)
    mesh = getattr(context, "mesh", None)
    if mesh is not None:  # inside shard_map: fully manual runs the call as it is
        return mesh.size > 1 and set(context.manual_axes) != set(mesh.axis_names)
    return getattr(context, "num_devices", 1) > 1


def _lowering(onednn_impl, lax_impl, cpu_fallback, multiple_results=False):
    def cpu(ctx, *args, geom, strict, **params):
        if jax_internals.for_export(ctx):
            # A serialized program outlives this process and its extension: XLA's convolution
            # (the one CPUs without oneDNN run), which any XLA:CPU can execute.
            if strict:
                raise ValueError("conv='onednn' cannot be exported (the oneDNN call lives in "
                                 "this process only); export with conv='auto' or conv='xla'")
            return _api.lower_fun(functools.partial(cpu_fallback, geom=geom, **params),
                                  multiple_results)(ctx, *args)
        x_dtype = ctx.avals_in[0].dtype
        why = _runs_on_onednn(x_dtype, geom)
        if not why and _partitioning_key_unsafe(ctx):
            why = _SHARED_KEY_WHY
            if not strict:
                warnings.warn(f"vgg_flax: XLA's convolution instead of oneDNN ({why})",
                              stacklevel=2)
        if why and strict:
            raise ValueError(f"conv='onednn' cannot run this convolution here: {why}; "
                             "use conv='auto' (XLA's convolution where oneDNN cannot run)")
        impl = cpu_fallback if why else onednn_impl
        return _api.lower_fun(functools.partial(impl, geom=geom, **params),
                              multiple_results)(ctx, *args)

    def other(ctx, *args, geom, strict, **params):
        if strict:
            raise ValueError("conv='onednn' runs on CPU only; use conv='auto' on "
                             f"{ctx.module_context.platforms}")
        return _api.lower_fun(functools.partial(lax_impl, geom=geom, **params),
                              multiple_results)(ctx, *args)
    return cpu, other


# -- differentiation: each primitive is bilinear; the family is closed under transposition --

def _zero(t) -> bool:
    return type(t) is _api.Zero


def _add(terms, like):
    terms = [t for t in terms if t is not None]
    if not terms:
        return _api.Zero(_api.typeof(like).to_tangent_aval())
    return functools.reduce(lax.add, terms)


def _bias_grad(ct, b_dtype):
    return ct.astype(jnp.float32).sum((0, 1, 2)).astype(b_dtype)


def _conv_jvp(primals, tangents, *, geom, relu, precision, strict):
    x, w, *b = primals
    dx, dw, *db = tangents
    kw = dict(geom=geom, precision=precision, strict=strict)
    y = conv_p.bind(x, w, *b, relu=relu, **kw)
    db = [t for t in db if not _zero(t)]
    # The bias tangent rides with the kernel's, so that the transpose of that term is one
    # fused weight-and-bias gradient call.
    terms = [None if _zero(dx) else conv_p.bind(dx, w, relu=False, **kw),
             None if _zero(dw) else conv_p.bind(x, dw, *db, relu=False, **kw),
             lax.broadcast_in_dim(db[0].astype(y.dtype), y.shape, (3,))
             if db and _zero(dw) else None]
    dy = _add(terms, y)
    if relu and not _zero(dy):
        dy = _relu_mask(y, dy)
    return y, dy


def _conv_transpose(ct, x, w, *b, geom, relu, precision, strict):
    assert not relu, "a ReLU-fused convolution is not linear"
    kw = dict(geom=geom, precision=precision, strict=strict)
    bias_linear = bool(b) and _api.is_undefined_primal(b[0])
    outs: list[Any] = [None, None] + [None] * len(b)
    if _zero(ct):
        return [_api.Zero(a.aval) if _api.is_undefined_primal(a) else None for a in (x, w, *b)]
    if _api.is_undefined_primal(x):
        outs[0] = bwd_data_p.bind(ct, w, x_hw=tuple(x.aval.shape[1:3]), **kw)
    if _api.is_undefined_primal(w):
        grads = bwd_weights_p.bind(x, ct, w_shape=tuple(w.aval.shape), w_dtype=w.aval.dtype,
                                   b_dtype=b[0].aval.dtype if bias_linear else None, **kw)
        outs[1] = grads[0]
        if bias_linear:
            outs[2] = grads[1]
    elif bias_linear:
        outs[2] = _bias_grad(ct, b[0].aval.dtype)
    return outs


def _bwd_data_jvp(primals, tangents, *, geom, x_hw, precision, strict):
    (dy, w), (ddy, dw) = primals, tangents
    kw = dict(geom=geom, x_hw=x_hw, precision=precision, strict=strict)
    out = bwd_data_p.bind(dy, w, **kw)
    return out, _add([None if _zero(ddy) else bwd_data_p.bind(ddy, w, **kw),
                      None if _zero(dw) else bwd_data_p.bind(dy, dw, **kw)], out)


def _bwd_data_transpose(ct, dy, w, *, geom, x_hw, precision, strict):
    # <c, bwd_data(dy, w)> = <conv(c, w), dy>: the transpose in dy is conv, in w bwd_weights.
    kw = dict(geom=geom, precision=precision, strict=strict)
    if _zero(ct):
        return [_api.Zero(a.aval) if _api.is_undefined_primal(a) else None for a in (dy, w)]
    ct_dy = conv_p.bind(ct, w, relu=False, **kw) if _api.is_undefined_primal(dy) else None
    ct_w = (bwd_weights_p.bind(ct, dy, w_shape=tuple(w.aval.shape), w_dtype=w.aval.dtype,
                               b_dtype=None, **kw)[0] if _api.is_undefined_primal(w) else None)
    return [ct_dy, ct_w]


def _bwd_weights_jvp(primals, tangents, *, geom, w_shape, w_dtype, b_dtype, precision, strict):
    (x, dy), (dx, ddy) = primals, tangents
    kw = dict(geom=geom, w_shape=w_shape, w_dtype=w_dtype, precision=precision, strict=strict)
    out = bwd_weights_p.bind(x, dy, b_dtype=b_dtype, **kw)
    by_ddy = None if _zero(ddy) else bwd_weights_p.bind(x, ddy, b_dtype=b_dtype, **kw)
    by_dx = None if _zero(dx) else bwd_weights_p.bind(dx, dy, b_dtype=None, **kw)[0]
    tangent = [_add([by_ddy and by_ddy[0], by_dx], out[0])]
    if b_dtype is not None:  # db = sum(dy) does not depend on x
        tangent.append(by_ddy[1] if by_ddy else
                       _api.Zero(_api.typeof(out[1]).to_tangent_aval()))
    return out, tangent


def _bwd_weights_transpose(cts, x, dy, *, geom, w_shape, w_dtype, b_dtype, precision, strict):
    # <C, bwd_weights(x, dy)> = <conv(x, C), dy>: the transpose in x is bwd_data(dy, C), in dy
    # conv(x, C) (+ the bias cotangent, which pairs with sum(dy)).
    kw = dict(geom=geom, precision=precision, strict=strict)
    cw, cb = cts[0], (cts[1] if b_dtype is not None else _api.Zero(None))
    ct_x = ct_dy = None
    if _api.is_undefined_primal(x):
        ct_x = (_api.Zero(x.aval) if _zero(cw) else
                bwd_data_p.bind(dy, cw, x_hw=tuple(x.aval.shape[1:3]), **kw))
    if _api.is_undefined_primal(dy):
        if _zero(cw) and _zero(cb):
            ct_dy = _api.Zero(dy.aval)
        elif _zero(cw):
            ct_dy = lax.broadcast_in_dim(cb.astype(dy.aval.dtype), dy.aval.shape, (3,))
        else:
            ct_dy = conv_p.bind(x, cw, *([] if _zero(cb) else [cb]), relu=False, **kw)
    return [ct_x, ct_dy]



# -- vmap: a mapped batch of the activations alone folds into N; anything else loops --------

def _batcher(prim, foldable: bool):
    def rule(args, dims, **params):
        mapped = [d is not None for d in dims]
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [jnp.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args, dims)]
        if foldable and mapped[0] and not any(mapped[1:]):
            a = args[0]  # (mapped, N, ...) -> (mapped * N, ...): the call follows N
            y = prim.bind(a.reshape(-1, *a.shape[2:]), *args[1:], **params)
            return y.reshape(size, a.shape[1], *y.shape[1:]), 0

        def one(sliced):
            it = iter(sliced)
            return prim.bind(*[next(it) if m else a for a, m in zip(args, mapped)], **params)
        out = lax.map(one, [a for a, m in zip(args, mapped) if m])
        return out, ([0] * len(out) if prim.multiple_results else 0)
    return rule



def _define_primitives() -> str:
    """Defines and registers the three primitives; "" or why they could not be."""
    global conv_p, bwd_data_p, bwd_weights_p
    if _api is None:
        return "JAX's primitive machinery is not where vgg_flax.jax_internals looks"
    try:
        conv_p = _api.Primitive("vgg_flax_conv")
        bwd_data_p = _api.Primitive("vgg_flax_conv_bwd_data")
        bwd_weights_p = _api.Primitive("vgg_flax_conv_bwd_weights")
        bwd_weights_p.multiple_results = True  # [dw] or [dw, db]
        # On a CPU without oneDNN kernels for the dtype (bf16 without AVX-512), conv_p still
        # rounds once, as oneDNN does; on GPU/TPU it is flax's convolution exactly (conv="xla"
        # runs that on CPU too).
        for p, abstract, onednn_impl, lax_impl, cpu_fallback, multi in [
                (conv_p, _conv_abstract, _onednn_conv, _lax_conv,
                 functools.partial(_lax_conv, round_once=True), False),
                (bwd_data_p, _bwd_data_abstract, _onednn_bwd_data, _lax_bwd_data,
                 _lax_bwd_data, False),
                (bwd_weights_p, _bwd_weights_abstract, _onednn_bwd_weights, _lax_bwd_weights,
                 _lax_bwd_weights, True)]:
            p.def_abstract_eval(abstract)
            p.def_impl(functools.partial(_eager, p))
            cpu, other = _lowering(onednn_impl, lax_impl, cpu_fallback, multi)
            _api.register_lowering(p, cpu, platform="cpu")
            _api.register_lowering(p, other)
        for p, jvp, transpose in [(conv_p, _conv_jvp, _conv_transpose),
                                  (bwd_data_p, _bwd_data_jvp, _bwd_data_transpose),
                                  (bwd_weights_p, _bwd_weights_jvp, _bwd_weights_transpose)]:
            _api.primitive_jvps[p] = jvp
            _api.primitive_transposes[p] = transpose
        # vmap: a mapped batch of the activations alone folds into N; anything else loops.
        _api.primitive_batchers[conv_p] = _batcher(conv_p, foldable=True)
        _api.primitive_batchers[bwd_data_p] = _batcher(bwd_data_p, foldable=True)
        _api.primitive_batchers[bwd_weights_p] = _batcher(bwd_weights_p, foldable=False)
        # The CPU lowering partitions along the batch (custom_partitioning), which needs the
        # devices: so does any program holding these, as for JAX's own cuDNN attention.
        if not jax_internals.probe("devices_during_lowering"):
            jax_internals.devices_during_lowering().update((conv_p, bwd_data_p, bwd_weights_p))
    except Exception as e:  # noqa: BLE001 - last resort: JAX's internals may change in any way
        # between versions, and import vgg_flax must still work, on XLA's convolutions
        conv_p = bwd_data_p = bwd_weights_p = None
        return f"vgg_flax's primitives could not be defined on JAX {jax.__version__} ({e})"
    return ""


_DEFINE_ERROR = _define_primitives()


def _blocker() -> str:
    """"" when the oneDNN primitives can be used in this process, else why not."""
    return _DEFINE_ERROR or jax_internals.onednn_blocker()


# ---- public ----------------------------------------------------------------------------------

def _precision(precision: Any) -> Any:
    """``precision`` as a hashable primitive parameter, the context's default filled in now
    (``jax.default_matmul_precision`` applies where the convolution is written, as for lax's)."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
    return tuple(precision) if isinstance(precision, list) else precision


@functools.cache
def _warn_blocked(why: str) -> None:
    warnings.warn(f"vgg_flax: conv='auto' runs XLA's convolutions, not oneDNN's: {why}",
                  RuntimeWarning, stacklevel=4)


def conv(x, w, b=None, *, strides: Sequence[int] = (1, 1), padding: Any = ((0, 0), (0, 0)),
         dilation: Sequence[int] = (1, 1), relu: bool = False, precision: Any = None,
         impl: str = "auto"):
    """``relu?(conv(x, w) + b)`` for NHWC ``x`` and an HWIO ``w``; the result has ``x``'s dtype.

    ``impl``: "auto" (oneDNN on CPU where it can run, XLA's convolution elsewhere), "onednn"
    (oneDNN or an error) or "xla" (``lax.conv_general_dilated``). ``precision`` goes to XLA's
    convolution; oneDNN accumulates float32 in float32, which meets every level. ``w`` and ``b``
    are used in ``x``'s dtype (see the module docstring for how oneDNN avoids the cast).
    """
    if impl not in IMPLS:
        raise ValueError(f"conv implementation must be one of {IMPLS}, got {impl!r}")
    geom = geometry(x.shape, w.shape, strides, padding, dilation)
    precision = _precision(precision)
    # oneDNN pairs bfloat16 activations with float32 parameters (rounded in its weight reorder)
    # but has no float32 x bfloat16 convolution: parameters narrower than the activations are
    # widened first, exactly, as flax's promote_dtype would.
    w, b = (a if a is None or np.dtype(a.dtype).itemsize >= np.dtype(x.dtype).itemsize
            else a.astype(x.dtype) for a in (w, b))
    params = [a for a in (w, b) if a is not None]
    why = next((f"oneDNN convolutions take float32 or bfloat16 parameters, not {a.dtype}"
                for a in params if np.dtype(a.dtype) not in _FLOATS), "")
    if np.dtype(x.dtype) not in _FLOATS or any(p < 0 for pair in geom[1] for p in pair):
        why = _runs_on_onednn(x.dtype, geom)  # says which, without loading anything
    if impl != "xla" and not why and _blocker():
        why = _blocker()
        if impl == "auto":
            _warn_blocked(why)
    if impl == "onednn":
        why = why or _runs_on_onednn(x.dtype, geom)
        if why:
            raise ValueError(f"conv='onednn' cannot run this convolution here: {why}; "
                             "use conv='auto' (XLA's convolution where oneDNN cannot run)")
    if impl == "xla" or why:
        return _lax_conv(x, w, b, geom=geom, relu=relu, precision=precision)
    bias = [] if b is None else [b]
    return conv_p.bind(x, w, *bias, geom=geom, relu=bool(relu), precision=precision,
                       strict=impl == "onednn")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, **unknown):
    """``lax.conv_general_dilated`` through :func:`conv` where it can (NHWC/HWIO, one group, no
    input dilation, result in the operands' dtype), else lax's own: a drop-in for
    ``flax.linen.Conv(conv_general_dilated=...)``."""
    nhwc = (lhs.ndim == rhs.ndim == 4
            and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if (nhwc and not unknown and feature_group_count == 1 and lhs.dtype == rhs.dtype
            and tuple(lhs_dilation or (1, 1)) == (1, 1)
            and preferred_element_type in (None, lhs.dtype)):
        return conv(lhs, rhs, strides=window_strides, padding=padding,
                    dilation=rhs_dilation or (1, 1), precision=precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type, **unknown)
