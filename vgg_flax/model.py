"""The Flax Linen VGG: one module, driven by a cfg (see ``arch``), NHWC throughout.

Numerically the same function as torchvision's ``VGG`` (and SSD's VGG backbone), with weights in
the layout ``vgg_flax.from_torch`` produces: fc6's rows are in (H, W, C) order, so flattening an
NHWC map needs no transpose at run time.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vgg_flax import arch, onednn
from vgg_flax.fields import FIELDS, validate_fields

Array = jax.Array

# torchvision's VGG._initialize_weights: kaiming normal (fan_out, ReLU gain) for convolutions,
# N(0, 0.01) for linear layers, zeros for biases. SSD's conv6/conv7 are Xavier-uniform. Which
# law a layer follows is data: ``arch.Layer.init``.
def _kernel_draw(sample, key: Array, shape: Sequence[int], dtype: Any) -> Array:
    """``sample(key, shape, dtype)`` for an HWIO kernel, drawn as (kh kw, in, out) and reshaped.

    The same bits as drawing ``shape`` directly (threefry's counter is an element's row-major
    index), but XLA:CPU compiles a 4-D threefry loop nest ~1.8x slower than a 3-D one, once per
    distinct kernel shape: that was most of a first ``jax.jit(model.init)`` (tiny vgg11: 5 -> 3 s).
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
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_XAVIER_UNIFORM = nn.initializers.xavier_uniform()


def conv_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """torch's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` for an HWIO kernel:
    N(0, 2 / (kh kw out)); the values of flax's ``variance_scaling(2.0, "fan_out", "normal")``."""
    return _kernel_draw(_KAIMING_FAN_OUT, key, shape, dtype)


def ssd_conv_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """Xavier-uniform for an HWIO kernel: U(-a, a), a = sqrt(6 / (kh kw (in + out))); the values
    of flax's ``xavier_uniform()``."""
    return _kernel_draw(_XAVIER_UNIFORM, key, shape, dtype)


fc_init = nn.initializers.normal(stddev=0.01)  # (in, out) kernels: already a matrix draw
INITS = {"kaiming": conv_init, "xavier": ssd_conv_init, "fc": fc_init}


def init_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """``compiler_options`` for a jitted init: ``jax.jit(model.init, compiler_options=...)``.

    An init program is compiled once and run once, and XLA:CPU spends most of that compile in
    LLVM optimising the threefry draws. At LLVM -O1 the same program gives the same bits
    (tests/test_model.py) and runs as fast (vgg16's 138M draws: 1.3 s either way), and compiles
    in less time: a tiny vgg11's init 3.4 -> 1.4 s, vgg16's 2.1 -> 1.6 s. (-O0 compiles faster
    still but runs 4x slower and rounds differently.) Other backends keep their defaults.
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {"xla_backend_optimization_level": 1}


class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics.

    torch's momentum 0.1 is the weight of the *new* batch statistic, and torch tracks the
    *unbiased* batch variance in ``running_var`` while normalising with the biased one; Flax's
    ``nn.BatchNorm`` tracks the biased variance, so a converted model drifts from torch's in
    training. Statistics are computed in float32 whatever the compute dtype. Under ``jax.jit``
    with a batch sharded over devices the means are global, so no axis name is needed.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            xf = x.astype(jnp.float32)
            mean = xf.mean(axis=(0, 1, 2))
            var = jnp.square(xf - mean).mean(axis=(0, 1, 2))  # two-pass: no cancellation
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        # Fold into one multiply-add per element.
        mul = scale.astype(jnp.float32) * lax.rsqrt(var + self.epsilon)
        add = bias.astype(jnp.float32) - mean * mul
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


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
    # runs that reduction at a few GB/s. VGG-16's five pools at batch 8: 62 -> 10 ms (fp32).
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


class Conv(nn.Module):
    """A VGG convolution layer: stride 1, square kernel, symmetric padding, kernel dilation, bias,
    and optionally the ReLU after it.

    Parameters as ``nn.Conv``'s (``kernel`` HWIO, ``bias``) and the same dtype promotion. The
    computation is ``onednn.conv`` with implementation ``impl`` ("auto": oneDNN on CPU where it
    can run, XLA's convolution elsewhere; "onednn"; "xla"): the kernel and bias enter in their
    parameter dtype and are rounded to the compute dtype inside the convolution.
    """
    features: int
    kernel_size: int = 3
    padding: int = 1
    dilation: int = 1
    kernel_init: Any = conv_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    impl: str = "auto"
    relu: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel, bias)
        p = self.padding
        return onednn.conv(x.astype(dtype), kernel, bias, padding=((p, p), (p, p)),
                           dilation=(self.dilation,) * 2, relu=self.relu,
                           precision=self.precision, impl=self.impl)


class L2Norm(nn.Module):
    """SSD's L2Norm: per-position channel L2 normalisation times a learnable per-channel scale."""
    init_scale: float = 20.0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_scale), (x.shape[-1],),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        # F.normalize: x / max(||x||_2, 1e-12)
        norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True)), 1e-12)
        return (xf / norm * scale.astype(jnp.float32)).astype(x.dtype)


class FC(nn.Module):
    """A fully connected layer that can also run as a convolution over a feature map.

    Parameters are ``kernel`` (in, out) and ``bias`` as in ``nn.Dense``. With ``window`` set and a
    4-D input, the kernel is viewed as a (wh, ww, C, out) convolution (fc6 of dense evaluation,
    paper section 3.2); a 4-D input without ``window`` is a 1x1 convolution (fc7, fc8).
    """
    features: int
    window: tuple[int, int] | None = None
    kernel_init: Any = fc_init
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = self.window is not None and x.ndim == 4
        in_features = math.prod(self.window) * x.shape[-1] if conv else x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if conv:
            k = kernel.reshape(*self.window, x.shape[-1], self.features)
            y = lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=self.precision)
        else:
            y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision,
                                # float32 accumulation: XLA:CPU runs a bf16 x bf16 -> f32 dot
                                # natively, but upcasts a bf16 -> bf16 dot to f32 operands.
                                preferred_element_type=jnp.float32)
        return (y + bias).astype(self.dtype)


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2014) in NHWC.

    ``__call__(x, train=False)`` takes a float (N, H, W, C) batch, any C. It returns logits
    (N, num_classes) with the classifier, the last feature map without it (``include_top=False``:
    pool5, or relu7 for the SSD head), or, when ``taps`` names layers, a dict of those activations,
    stopping after the deepest one. With ``dense=True`` fc6-fc8 run as convolutions on any input
    size and the class score map (tap ``fc8``) is averaged over space (paper section 3.2).

    ``conv`` picks the convolution implementation, once, when the module is built: "auto" (the
    default: oneDNN's kernels on CPU where vgg_flax's extension is built and the CPU has them
    for the dtype, XLA's convolution elsewhere, decided per platform when the program is
    lowered), "onednn" (oneDNN or an error, never a silent fallback) or "xla" (XLA's own
    convolution on every platform). All three compute the same function and support every JAX
    transformation; ``precision`` goes to XLA's convolutions (oneDNN accumulates float32 in
    float32, which meets every level).

    Every field is checked against ``fields.FIELDS`` whenever a VGG is built or cloned: a value it may
    not hold is a one-line ValueError naming the field, the value and what is allowed.

    Use ``vgg_flax.create(name, ...)`` or the named classes (``VGG16`` ...) rather than a raw cfg.
    """
    cfg: Sequence[Any] = arch.CFGS["D"]
    batch_norm: bool = False
    head: str = "fc"
    num_classes: int = 1000
    include_top: bool = True
    dropout_rate: float = 0.5
    hidden_size: int = 4096
    width: float = 1.0
    pool_size: tuple[int, int] = (7, 7)
    l2norm: bool = False
    dense: bool = False
    taps: tuple[str, ...] = ()
    bn_momentum: float = 0.1
    bn_epsilon: float = 1e-5
    lrn_size: int = 5
    lrn_alpha: float = 5e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    conv: str = "auto"

    def __post_init__(self):
        # Every field is checked here, once, against FIELDS: create(), clone(), load(), the
        # converter's --set and the trainer's model_overrides all build a VGG, so a bad value
        # fails where it is set, in one line, before anything is traced.
        validate_fields({name: getattr(self, name) for name in FIELDS})
        if self.taps:
            valid = self.tap_names()
            unknown = [t for t in self.taps if t not in valid]
            if unknown:
                raise ValueError(f"VGG field taps: unknown tap(s) {unknown}; this VGG "
                                 f"has: {', '.join(valid)}")
        super().__post_init__()

    # -- the plan: a pure function of the fields, shared with the weight mapping --------------
    def layers(self) -> list[arch.Layer]:
        """Every layer of the forward pass in order (head included when ``include_top``)."""
        plan = arch.features_layers(self.cfg, self.batch_norm, self.width)
        if self.include_top:
            plan += (arch.fc_head_layers(self.hidden_size, self.num_classes) if self.head == "fc"
                     else arch.ssd_head_layers(self.hidden_size, self.width))
        return plan

    def tap_names(self) -> list[str]:
        """Names ``taps`` may use, in forward order."""
        names = []
        for layer in self.layers():
            if layer.kind != "dropout":
                names.append(layer.name)
            if layer.name == arch.L2NORM_AFTER and self.l2norm:
                names.append(arch.L2NORM_NAME)
        return names

    def min_input_size(self) -> int:
        """Smallest spatial size every 2x2 pool (and dense fc6's window) can take."""
        pools = [layer.pool for layer in self.layers() if layer.kind == "pool" and layer.pool != "3x3s1"]
        need = max(self.pool_size) if self.dense and self.include_top and self.head == "fc" else 1
        # Walk back from the last map: a floor pool needs 2n inputs for n outputs, a ceil pool
        # 2n - 1, and any 2x2 pool at least 2.
        for pool in reversed(pools):
            need = max(2, 2 * need if pool == "floor" else 2 * need - 1)
        return need

    def _check_input(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"VGG expects an NHWC batch (N, H, W, C), got shape {x.shape}; "
                             "add a batch axis with x[None] or move channels last")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"VGG expects float input, got {x.dtype}; "
                             "normalise images first, e.g. with vgg_flax.preprocess")
        if x.shape[0] == 0:
            raise ValueError(f"VGG got an empty batch, shape {x.shape}; pass at least one image")
        m = self.min_input_size()
        if x.shape[1] < m or x.shape[2] < m:
            if x.shape[1] <= 4 and min(x.shape[2], x.shape[3]) >= m:
                raise ValueError(f"input shape {x.shape} looks channels-first (NCHW); VGG takes "
                                 "NHWC: x.transpose(0, 2, 3, 1)")
            raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is smaller than the {m}x{m} "
                             "minimum of this VGG; resize the images up")

    def _stop(self) -> int:
        """Index in ``layers()`` of the last layer to compute."""
        plan = self.layers()
        if not self.taps or self.is_initializing():
            return len(plan) - 1  # init always creates every parameter (taps: __post_init__)
        index = {layer.name: i for i, layer in enumerate(plan)}
        index[arch.L2NORM_NAME] = index.get(arch.L2NORM_AFTER, 0)
        return max(index[t] for t in self.taps)

    @nn.compact
    def __call__(self, x: Array, train: bool = False):
        self._check_input(x)
        plan, stop = self.layers(), self._stop()
        want = set(self.taps)
        out: dict[str, Array] = {}
        x = x.astype(self.dtype)
        fused = False
        for i, layer in enumerate(plan[: stop + 1]):
            if fused:  # this ReLU ran inside the convolution before it
                fused = False
            else:
                # A convolution whose own output is not asked for applies the following ReLU
                # as it writes its result (one pass over the activations fewer on oneDNN).
                fused = (layer.kind == "conv" and layer.name not in want and i < stop
                         and plan[i + 1].kind == "relu")
                x = self.apply_layer(layer, x, train, relu=fused)
            if layer.name in want:
                out[layer.name] = x
            if layer.name == arch.L2NORM_AFTER and self.l2norm and (
                    arch.L2NORM_NAME in want or self.is_initializing()):
                out[arch.L2NORM_NAME] = L2Norm(param_dtype=self.param_dtype,
                                               name=arch.L2NORM_NAME)(x)
        if self.taps:
            return {t: out[t] for t in self.taps}
        if self.dense and self.include_top and self.head == "fc":
            return x.mean(axis=(1, 2))  # average the class score map (paper section 3.2)
        return x

    def apply_layer(self, layer: arch.Layer, x: Array, train: bool, relu: bool = False) -> Array:
        """One layer of ``layers()`` on ``x`` (its parameters named ``layer.name``); ``relu``
        fuses the ReLU that follows a convolution. Call inside a compact method."""
        kind = layer.kind
        if kind == "conv":
            return Conv(layer.features, layer.kernel, layer.padding, layer.dilation,
                        kernel_init=INITS[layer.init], dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision, impl=self.conv,
                        relu=relu, name=layer.name)(x)
        if kind == "bn":
            return BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=layer.name)(x, train)
        if kind == "relu":
            return onednn.torch_relu(x)  # torch's ReLU: NaN passes its gradient on
        if kind == "lrn":
            return local_response_norm(x, self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k)
        if kind == "pool":
            if layer.pool == "3x3s1":
                return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
            return max_pool_2x2(x, ceil_mode=layer.pool == "ceil")
        if kind == "dropout":
            return nn.Dropout(self.dropout_rate, deterministic=not train, name=layer.name)(x)
        if kind == "fc":
            window = None
            if layer.reads_map:
                if self.dense:
                    window = tuple(self.pool_size)
                else:
                    x = adaptive_avg_pool(x, self.pool_size)
                    x = x.reshape(x.shape[0], -1)  # (H, W, C) order: see from_torch
            return FC(layer.features, window=window, kernel_init=INITS[layer.init],
                      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                      name=layer.name)(x)
        raise ValueError(f"unknown layer kind {kind!r}")


def abstract_variables(module: VGG, in_channels: int = 3) -> dict[str, Any]:
    """Shapes and dtypes of ``module.init``'s variables, computing nothing."""
    s = module.min_input_size()
    x = jax.ShapeDtypeStruct((1, s, s, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def _leaf_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaf_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = tuple(getattr(v, "shape", ()))
    return out


def variables_mismatch(module: VGG, variables: Mapping[str, Any]) -> str | None:
    """None when ``variables`` have the tree and shapes of ``module.init``'s (for the input
    channels conv1_1 reads), else one line naming the leaves that differ. Computes nothing."""
    try:
        in_channels = int(variables["params"]["conv1_1"]["kernel"].shape[2])
    except (KeyError, TypeError, IndexError, AttributeError):
        in_channels = 3
    want = _leaf_shapes(abstract_variables(module, in_channels))
    got = _leaf_shapes(variables) if isinstance(variables, Mapping) else {}
    if got == want:
        return None
    problems = [f"{k} is {got[k]}, expected {s}" for k, s in want.items()
                if k in got and got[k] != s]
    problems += [f"{k} is missing" for k in want if k not in got]
    problems += [f"{k} is not used by this VGG" for k in got if k not in want]
    more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    return "; ".join(problems[:4]) + more


def count_macs(module: VGG, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of an NHWC ``input_shape`` (batch included).

    Counts every kernel tap, zero padding included, as torchvision's GFLOPS meta does (XLA's
    cost analysis leaves out taps that fall on padding, about 3% of VGG-16 at 224x224).
    """
    variables = abstract_variables(module, input_shape[-1])
    weighted = [layer.name for layer in module.layers() if layer.kind in ("conv", "fc")]
    shapes = jax.eval_shape(module.clone(taps=tuple(weighted)).apply, variables,
                            jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    total = 0
    for name in weighted:
        kernel = variables["params"][name]["kernel"].shape
        total += math.prod(shapes[name].shape) * math.prod(kernel[:-1])
    return total
