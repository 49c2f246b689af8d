"""VGG's layers as pure functions of arrays, shared by the Linen (``model.py``) and NNX
(``nnx.py``) front ends: each front end only holds the parameters and state and calls these.

Every function is NHWC and computes what torch's layer of the same name computes; parameters
enter in their own dtype and are promoted as ``flax.linen.dtypes.promote_dtype`` does.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax.linen import initializers, max_pool
from flax.linen.dtypes import promote_dtype
from jax import lax

from vgg_flax import arch, onednn

Array = jax.Array

# torchvision's VGG._initialize_weights: kaiming normal (fan_out, ReLU gain) for convolutions,
# N(0, 0.01) for linear layers, zeros for biases. SSD's conv6/conv7 are Xavier-uniform. Which
# law a layer follows is data: ``arch.Layer.init``.
def _kernel_draw(sample, key: Array, shape: Sequence[int], dtype: Any) -> Array:
    """``sample(key, shape, dtype)`` for an HWIO kernel, drawn as (kh kw, in, out) and reshaped.

    The same bits as drawing ``shape`` directly (threefry's counter is an element's row-major
    index), but XLA:CPU compiles a 4-D threefry loop nest ~1.8x slower than a 3-D one, once per
    distinct kernel shape, and those compiles dominate a first ``jax.jit(model.init)``.
    Only the spatial axes merge: FSDP shards a kernel's input or output channels
    (train/sharding.py), and a sharded init must keep that axis whole to give one device's values
    bit for bit (merging in and out as well compiles faster still, but the resharding changed a
    few ulps: tests/test_train.py::test_sharding_matches_one_device).
    """
    shape = tuple(shape)
    if len(shape) <= 3:
        return sample(key, shape, dtype)
    return sample(key, (math.prod(shape[:-2]),) + shape[-2:], dtype).reshape(shape)


# The laws are jax's own, drawn on the (kh kw, in, out) view (the same fans: a kernel's receptive
# field is its spatial extent either way), so the values are theirs on every JAX: jax 0.12 changed
# how variance_scaling's normal scales its draw (by 1 ulp on ~40% of elements), and a copy of the
# arithmetic would have drifted with it.
_KAIMING_FAN_OUT = initializers.variance_scaling(2.0, "fan_out", "normal")
_XAVIER_UNIFORM = initializers.xavier_uniform()


def conv_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """torch's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` for an HWIO kernel:
    N(0, 2 / (kh kw out)); the values of flax's ``variance_scaling(2.0, "fan_out", "normal")``."""
    return _kernel_draw(_KAIMING_FAN_OUT, key, shape, dtype)


def ssd_conv_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """Xavier-uniform for an HWIO kernel: U(-a, a), a = sqrt(6 / (kh kw (in + out))); the values
    of flax's ``xavier_uniform()``."""
    return _kernel_draw(_XAVIER_UNIFORM, key, shape, dtype)


fc_init = initializers.normal(stddev=0.01)  # (in, out) kernels: already a matrix draw
INITS = {"kaiming": conv_init, "xavier": ssd_conv_init, "fc": fc_init}


def local_response_norm(x: Array, size: int = 5, alpha: float = 5e-4, beta: float = 0.75,
                        k: float = 2.0) -> Array:
    """``torch.nn.LocalResponseNorm`` over the channel axis of an NHWC map.

    torch divides ``alpha`` by ``size``; alpha=5e-4, size 5, beta 0.75, k 2 therefore give
    Krizhevsky et al.'s b = a / (2 + 1e-4 * sum a^2)^0.75, the paper's A-LRN setting.
    """
    sq = jnp.square(x.astype(jnp.float32))
    pad = ((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2))
    ssum = lax.reduce_window(sq, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1), pad)
    return (x.astype(jnp.float32) / (k + (alpha / size) * ssum) ** beta).astype(x.dtype)


def adaptive_avg_pool(x: Array, out_hw: Sequence[int]) -> Array:
    """``torch.nn.AdaptiveAvgPool2d`` on NHWC: bin i spans [floor(i*n/o), ceil((i+1)*n/o)).

    When n is not a multiple of o the bins are uneven and overlap; each is averaged on its own
    slice, exactly as torch does, rather than approximated by a resize.
    """
    for axis, o in zip((1, 2), out_hw):
        n = x.shape[axis]
        if n == o:
            continue
        if n % o == 0:
            shape = x.shape[:axis] + (o, n // o) + x.shape[axis + 1:]
            x = x.reshape(shape).mean(axis=axis + 1)
            continue
        bins = [lax.slice_in_dim(x, (i * n) // o, -((-(i + 1) * n) // o), axis=axis)
                .mean(axis=axis, keepdims=True) for i in range(o)]
        x = jnp.concatenate(bins, axis=axis)
    return x


@jax.custom_jvp
def _max_pool_2x2(x: Array) -> Array:
    # Two element-wise maxima (row pairs, then the column pair, which sits side by side in the
    # channel axis once w is halved) rather than a max-reduction over a 6-D reshape: XLA:CPU
    # runs that reduction at a few GB/s, six times slower for VGG-16's five pools (fp32).
    n, h, w, c = x.shape
    rows = x.reshape(n, h // 2, 2, w // 2, 2 * c)
    pairs = jnp.maximum(rows[:, :, 0], rows[:, :, 1])
    return jnp.maximum(pairs[..., :c], pairs[..., c:])


def _window_positions() -> Array:
    # row-major position (0..3) of each element of a 2x2 window, shaped for the 6-D view
    return (lax.broadcasted_iota(jnp.int8, (1, 1, 2, 1, 2, 1), 2) * 2
            + lax.broadcasted_iota(jnp.int8, (1, 1, 2, 1, 2, 1), 4))


def _first_max(x: Array) -> Array:
    """Row-major position (0..3) of the first maximum of every 2x2 window (a NaN counts as the
    maximum, and of several NaNs the last), int8 (n, h/2, w/2, c), as torch's max_pool2d picks it.

    The window's elements are compared with each other (no equality test against a separately
    computed maximum), read by strided slices of ``x``, not through a reshape: XLA makes a
    reshape a bitcast outside the fusion that computes ``x``'s cotangent, misses that the
    bitcast is ``x``'s own buffer, and can write the cotangent over ``x`` in place while it
    still reads ``x``'s other window elements (jaxlib 0.10.2: gradients wrong by up to 100%
    behind a fused ReLU, caught by tests/test_transforms.py's pool-gradient test). This form is
    also 1.8x faster backward than the equality form (VGG-16's pool1, batch 8).
    """
    a, b, c, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]

    def first(p, q):  # is p, which comes first, the maximum of the pair? (torch: the first
        return ~jnp.isnan(q) & ((p >= q) | jnp.isnan(p))  # maximum, but the last NaN)

    left_top, left_bottom = first(a, b), first(c, d)
    upper = first(jnp.where(left_top, a, b), jnp.where(left_bottom, c, d))
    i8 = lambda v: jnp.asarray(v, jnp.int8)  # noqa: E731
    return jnp.where(upper, jnp.where(left_top, i8(0), i8(1)), jnp.where(left_bottom, i8(2), i8(3)))


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    # The derivative is the tangent of the first maximum of each window in row-major order, as
    # torch's max_pool2d routes the gradient (ties are common after a ReLU: all-zero windows).
    # Written as a linear function of the tangent, so reverse mode transposes it (one select
    # over the window view of the cotangent, no select-and-scatter) and forward mode, HVPs and
    # jacfwd differentiate it as it stands.
    (x,), (dx,) = primals, tangents
    n, h, w, c = x.shape
    first = _first_max(x)[:, :, None, :, None, :]
    picked = jnp.where(_window_positions() == first, dx.reshape(n, h // 2, 2, w // 2, 2, c),
                       jnp.zeros((), dx.dtype))
    return _max_pool_2x2(x), picked.sum(axis=(2, 4))


def max_pool_2x2(x: Array, ceil_mode: bool = False) -> Array:
    """``F.max_pool2d(x, 2, 2, ceil_mode=...)`` on NHWC, forward and gradient equal to torch's.

    Written as a reshape and a max rather than ``lax.reduce_window``: on XLA:CPU the gradient of
    a reduce-window pool is a select-and-scatter that computes window argmaxes with iota
    operands; this one is three element-wise passes, 3.6x faster for VGG's pool1 backward
    (docs/performance.md). Odd sizes drop the last row/column (floor) or pad it with -inf (ceil).
    """
    n, h, w, c = x.shape
    if ceil_mode:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    else:
        x = x[:, : h - h % 2, : w - w % 2]
    return _max_pool_2x2(x)



def max_pool_3x3s1(x: Array) -> Array:
    """``F.max_pool2d(x, 3, 1, padding=1)`` (SSD's pool5): the map keeps its size."""
    return max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def conv(x: Array, kernel: Array, bias: Array, *, padding: int, dilation: int, dtype: Any = None,
         precision: Any = None, impl: str = "auto", relu: bool = False) -> Array:
    """A VGG convolution: stride 1, symmetric ``padding``, ``dilation``, bias, and the ReLU after
    it when ``relu``. ``dtype`` None computes in the promoted dtype of ``x`` and the parameters
    (``nn.Conv``'s rule); the kernel and bias enter ``onednn.conv`` in their parameter dtype and
    are rounded to the compute dtype inside the convolution ("auto": oneDNN on CPU where it can
    run, XLA's convolution elsewhere; "onednn"; "xla")."""
    dtype = dtype or jnp.result_type(x, kernel, bias)
    p = padding
    return onednn.conv(x.astype(dtype), kernel, bias, padding=((p, p), (p, p)),
                       dilation=(dilation, dilation), relu=relu, precision=precision, impl=impl)


def batch_norm(x: Array, scale: Array, bias: Array, mean: Array, var: Array, *, train: bool,
               momentum: float = 0.1, epsilon: float = 1e-5, dtype: Any = jnp.float32
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """BatchNorm2d with torch's semantics: ``(y, (running_mean, running_var))`` in training
    (the updated statistics), ``(y, None)`` with the running statistics.

    torch's momentum 0.1 is the weight of the *new* batch statistic, and torch tracks the
    *unbiased* batch variance in ``running_var`` while normalising with the biased one; Flax's
    ``BatchNorm`` tracks the biased variance, so a converted model would drift from torch's in
    training. Statistics are computed in float32 whatever the compute dtype. Under ``jax.jit``
    with a batch sharded over devices the means are global, so no axis name is needed.
    """
    c = x.shape[-1]
    updated = None
    if train:
        xf = x.astype(jnp.float32)
        batch_mean = xf.mean(axis=(0, 1, 2))
        batch_var = jnp.square(xf - batch_mean).mean(axis=(0, 1, 2))  # two-pass: no cancellation
        n = x.size // c
        updated = ((1 - momentum) * mean + momentum * batch_mean,
                   (1 - momentum) * var + momentum * batch_var * (n / max(n - 1, 1)))
        mean, var = batch_mean, batch_var
    # Fold into one multiply-add per element.
    mul = scale.astype(jnp.float32) * lax.rsqrt(var + epsilon)
    add = bias.astype(jnp.float32) - mean * mul
    return x * mul.astype(dtype) + add.astype(dtype), updated


def fc_input(x: Array, pool_size: Sequence[int], dense: bool
             ) -> tuple[Array, tuple[int, int] | None]:
    """What fc6 (the layer that reads the whole map) takes: ``(x, window)``. Normally the map
    adaptive-average-pooled to ``pool_size`` and flattened in (H, W, C) order (the order
    ``from_torch`` gives fc6's rows, so no transpose runs); in dense evaluation the map itself,
    with ``pool_size`` as fc6's convolution window (paper section 3.2)."""
    if dense:
        return x, tuple(pool_size)
    x = adaptive_avg_pool(x, pool_size)
    return x.reshape(x.shape[0], -1), None


def fc(x: Array, kernel: Array, bias: Array, *, window: tuple[int, int] | None = None,
       dtype: Any = jnp.float32, precision: Any = None) -> Array:
    """A fully connected layer with an (in, out) ``kernel``, as ``nn.Dense``; on a 4-D input it
    runs as a convolution: with ``window`` the kernel is viewed as (wh, ww, C, out) (dense fc6),
    without it as 1x1 (dense fc7, fc8)."""
    out = kernel.shape[-1]
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    if window is not None and x.ndim == 4:
        k = kernel.reshape(*window, x.shape[-1], out)
        y = lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)
    else:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                            # float32 accumulation: XLA:CPU runs a bf16 x bf16 -> f32 dot
                            # natively, but upcasts a bf16 -> bf16 dot to f32 operands.
                            preferred_element_type=jnp.float32)
    return (y + bias).astype(dtype)


def fc_in_features(window: Sequence[int] | None, channels: int) -> int:
    """Rows of an fc kernel reading ``channels`` channels (through ``window`` for fc6)."""
    return math.prod(window) * channels if window is not None else channels


def l2norm(x: Array, scale: Array) -> Array:
    """SSD's L2Norm: per-position channel L2 normalisation times a learnable per-channel scale
    (``F.normalize``: x / max(||x||_2, 1e-12))."""
    xf = x.astype(jnp.float32)
    norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True)), 1e-12)
    return (xf / norm * scale.astype(jnp.float32)).astype(x.dtype)


L2NORM_INIT_SCALE = 20.0  # ssd.pytorch's and torchvision's initial L2Norm scale


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout (``nn.Dropout``'s draw: one Bernoulli keep mask of ``x``'s shape).
    ``key`` None, or ``rate`` 0, is the identity (evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, p=keep, shape=x.shape)
    return lax.select(mask, x / keep, jnp.zeros_like(x))


def stateless(layer: arch.Layer, x: Array, fields: Any) -> Array:
    """A layer without parameters or state (ReLU, LRN, pool) of a VGG with ``fields`` (an object
    with the VGG's ``lrn_*`` attributes)."""
    if layer.kind == "relu":
        return onednn.torch_relu(x)  # torch's ReLU: NaN passes its gradient on
    if layer.kind == "lrn":
        return local_response_norm(x, fields.lrn_size, fields.lrn_alpha, fields.lrn_beta,
                                   fields.lrn_k)
    if layer.kind == "pool":
        if layer.pool == "3x3s1":
            return max_pool_3x3s1(x)
        return max_pool_2x2(x, ceil_mode=layer.pool == "ceil")
    raise ValueError(f"layer {layer.name} of kind {layer.kind!r} has parameters or state")
