"""The Flax Linen VGG: one module, driven by a cfg (see ``arch``), NHWC throughout.

Numerically the same function as torchvision's ``VGG`` (and SSD's VGG backbone), with weights in
the layout ``vgg_flax.from_torch`` produces: fc6's rows are in (H, W, C) order, so flattening an
NHWC map needs no transpose at run time.

The forward pass is ``walk`` and each layer's arithmetic a function of ``layers``; ``Plan`` is
what a VGG's fields say about its layers. The NNX front end (``vgg_flax.nnx``) uses all three,
so the two front ends hold parameters differently and compute the same thing.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_flax import arch, layers
from vgg_flax.fields import FIELDS, validate_fields
from vgg_flax.layers import INITS, conv_init, fc_init  # noqa: F401  (the laws, by name)

Array = jax.Array


def init_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """``compiler_options`` for a jitted init: ``jax.jit(model.init, compiler_options=...)``.

    An init program is compiled once and run once, and XLA:CPU spends most of that compile in
    LLVM optimising the threefry draws. At LLVM -O1 the same program gives the same bits
    (tests/test_model.py) and runs as fast (vgg16's 138M draws: 1.3 s either way), and compiles
    sooner, which is most of an init's time: a tiny vgg11's in 1.4 s against 3.4 s at the
    default level, vgg16's in 1.6 s against 2.1 s. (-O0 compiles faster still but runs 4x
    slower and rounds differently.) Other backends keep their defaults.
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {"xla_backend_optimization_level": 1}


class Conv(nn.Module):
    """A VGG convolution (``layers.conv``), optionally with the ReLU after it. Parameters as
    ``nn.Conv``'s: ``kernel`` HWIO and ``bias``."""
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
        return layers.conv(x, kernel, bias, padding=self.padding, dilation=self.dilation,
                           dtype=self.dtype, precision=self.precision, impl=self.impl,
                           relu=self.relu)


class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics (``layers.batch_norm``): parameters ``scale``,
    ``bias``; running statistics ``mean``, ``var`` in the ``batch_stats`` collection."""
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
        y, updated = layers.batch_norm(x, scale, bias, ra_mean.value, ra_var.value, train=train,
                                       momentum=self.momentum, epsilon=self.epsilon,
                                       dtype=self.dtype)
        if updated is not None and not self.is_initializing():
            ra_mean.value, ra_var.value = updated
        return y


class L2Norm(nn.Module):
    """SSD's L2Norm (``layers.l2norm``) with its learnable per-channel ``scale``."""
    init_scale: float = layers.L2NORM_INIT_SCALE
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_scale), (x.shape[-1],),
                           self.param_dtype)
        return layers.l2norm(x, scale)


class FC(nn.Module):
    """A fully connected layer (``layers.fc``): ``kernel`` (in, out) and ``bias`` as in
    ``nn.Dense``; with ``window`` and a 4-D input it runs as a convolution."""
    features: int
    window: tuple[int, int] | None = None
    kernel_init: Any = fc_init
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        window = self.window if x.ndim == 4 else None
        kernel = self.param("kernel", self.kernel_init,
                            (layers.fc_in_features(window, x.shape[-1]), self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return layers.fc(x, kernel, bias, window=window, dtype=self.dtype,
                         precision=self.precision)


class Dropout(nn.Module):
    """``layers.dropout`` with a key from the ``dropout`` stream (``nn.Dropout``'s draw)."""
    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        return layers.dropout(x, self.rate, self.make_rng("dropout"))


class Plan:
    """What a VGG's fields say about its layers, for any object holding the fields as attributes
    (the Linen ``VGG`` and ``vgg_flax.nnx.VGG``): pure functions of the fields."""

    def validate(self) -> None:
        """One-line ValueError for a field value ``fields.FIELDS`` does not allow, or an unknown
        tap."""
        validate_fields({name: getattr(self, name) for name in FIELDS})
        if self.taps:
            valid = self.tap_names()
            unknown = [t for t in self.taps if t not in valid]
            if unknown:
                raise ValueError(f"VGG field taps: unknown tap(s) {unknown}; this VGG "
                                 f"has: {', '.join(valid)}")

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

    def check_input(self, x: Array) -> None:
        """ValueError (one line) for an input this VGG cannot take."""
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

    @property
    def averages(self) -> bool:
        """Whether the output is the class score map averaged over space (dense evaluation)."""
        return self.dense and self.include_top and self.head == "fc"


def walk(plan: Sequence[arch.Layer], x: Array, run: Callable[[arch.Layer, Array, bool], Array],
         l2norm: Callable[[Array], Array] | None = None, *, taps: Sequence[str] = (),
         everything: bool = False, average: bool = False):
    """The forward pass over ``plan`` (``Plan.layers()``), for both front ends.

    ``run(layer, x, relu)`` computes one layer; ``relu`` asks a convolution to apply the ReLU
    that follows it as it writes its result (one pass over the activations fewer on oneDNN),
    which ``walk`` does when the convolution's own output is not a tap, and then skips that
    ReLU. ``l2norm`` is SSD's L2Norm branch on relu4_3 (None: none). With ``taps`` the result
    is the dict of those activations in their order and the walk stops after the deepest one,
    unless ``everything`` (an init, which must create every parameter); ``average`` averages
    the last map over space (dense evaluation's class scores, paper section 3.2).
    """
    stop = len(plan) - 1
    if taps and not everything:
        index = {layer.name: i for i, layer in enumerate(plan)}
        index[arch.L2NORM_NAME] = index.get(arch.L2NORM_AFTER, 0)
        stop = max(index[t] for t in taps)
    want = set(taps)
    out: dict[str, Array] = {}
    fused = False
    for i, layer in enumerate(plan[: stop + 1]):
        if fused:  # this ReLU ran inside the convolution before it
            fused = False
        else:
            fused = (layer.kind == "conv" and layer.name not in want and i < stop
                     and plan[i + 1].kind == "relu")
            x = run(layer, x, fused)
        if layer.name in want:
            out[layer.name] = x
        if layer.name == arch.L2NORM_AFTER and l2norm is not None and (
                arch.L2NORM_NAME in want or everything):
            out[arch.L2NORM_NAME] = l2norm(x)
    if taps:
        return {t: out[t] for t in taps}
    if average:
        return x.mean(axis=(1, 2))
    return x


class VGG(nn.Module, Plan):
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
        self.validate()
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False):
        self.check_input(x)
        l2norm = None
        if self.l2norm:
            l2norm = L2Norm(param_dtype=self.param_dtype, name=arch.L2NORM_NAME)
        return walk(self.layers(), x.astype(self.dtype),
                    lambda layer, x, relu: self.apply_layer(layer, x, train, relu), l2norm,
                    taps=self.taps, everything=self.is_initializing(), average=self.averages)

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
        if kind == "dropout":
            return Dropout(self.dropout_rate, name=layer.name)(x, train)
        if kind == "fc":
            window = None
            if layer.reads_map:
                x, window = layers.fc_input(x, self.pool_size, self.dense)
            return FC(layer.features, window=window, kernel_init=INITS[layer.init],
                      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                      name=layer.name)(x)
        return layers.stateless(layer, x, self)


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
