"""VGG as a native Flax NNX module: the same layers, walk and parameter names as the Linen one.

>>> from flax import nnx
>>> import vgg_flax.nnx
>>> model = vgg_flax.nnx.create("vgg16", num_classes=10, rngs=nnx.Rngs(0))
>>> model = vgg_flax.nnx.VGG16(taps=("relu1_2", "relu4_3"))
>>> model = vgg_flax.nnx.pretrained("vgg16")              # ImageNet weights
>>> module, variables = vgg_flax.nnx.to_linen(model)      # and back: to_nnx(module, variables)

The forward pass is ``vgg_flax.model.walk`` over ``Plan.layers()`` and each layer's arithmetic a
function of ``vgg_flax.layers``, as in the Linen module: only where the parameters live differs.
Layers with parameters or state are attributes named after the paper (``model.conv1_1``,
``model.bn1_1``, ``model.fc8``, SSD's ``model.conv4_3_norm``), holding ``kernel``/``bias``
(``nnx.Param``), BatchNorm's ``scale``/``bias`` and running ``mean``/``var`` (``nnx.BatchStat``),
so ``nnx.state(model, nnx.Param)`` is Linen's ``variables["params"]`` and
``nnx.state(model, nnx.BatchStat)`` its ``variables["batch_stats"]``, leaf for leaf.

A model starts in evaluation mode, the function the Linen module computes by default
(``apply(variables, x)``): BatchNorm uses its running statistics and dropout is off.
``model.train()`` switches both (``use_running_average``, ``deterministic``), ``model.eval()``
back. Initialisation follows the same laws as Linen's (``model.INITS``) with NNX's keys
(``rngs.params()`` per parameter), so the draws differ from ``VGG.init``'s; ``to_nnx`` of
Linen's variables gives Linen's values exactly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vgg_flax import arch, layers, model as linen
from vgg_flax.model import INITS, Plan, walk
from vgg_flax.weights import WeightMismatchError, on_device

Array = jax.Array

# The fields of the Linen VGG and their defaults: one table for both front ends.
FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(linen.VGG)
                                  if f.name not in ("parent", "name")}


def _frozen(v: Any) -> Any:
    # JSON and users give lists; NNX keeps non-array attributes as static (hashable) metadata.
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


class Conv(nnx.Module):
    """A VGG convolution (``layers.conv``): ``kernel`` HWIO and ``bias``, as Linen's ``Conv``."""

    def __init__(self, in_features: int, layer: arch.Layer, *, dtype: Any, param_dtype: Any,
                 precision: Any, impl: str, rngs: nnx.Rngs):
        k = layer.kernel
        self.kernel = nnx.Param(INITS[layer.init](rngs.params(),
                                                  (k, k, in_features, layer.features),
                                                  param_dtype))
        self.bias = nnx.Param(jnp.zeros((layer.features,), param_dtype))
        self.padding, self.dilation = layer.padding, layer.dilation
        self.dtype, self.precision, self.impl = dtype, precision, impl

    def __call__(self, x: Array, relu: bool = False) -> Array:
        return layers.conv(x, self.kernel.get_value(), self.bias.get_value(),
                           padding=self.padding, dilation=self.dilation, dtype=self.dtype,
                           precision=self.precision, impl=self.impl, relu=relu)


class BatchNorm(nnx.Module):
    """BatchNorm2d with torch's semantics (``layers.batch_norm``); ``use_running_average``
    as ``nnx.BatchNorm``'s, set by ``model.train()`` / ``model.eval()``."""

    def __init__(self, num_features: int, *, momentum: float, epsilon: float, dtype: Any,
                 param_dtype: Any, use_running_average: bool = True):
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.use_running_average = use_running_average

    def __call__(self, x: Array) -> Array:
        y, updated = layers.batch_norm(x, self.scale.get_value(), self.bias.get_value(),
                                       self.mean.get_value(), self.var.get_value(),
                                       train=not self.use_running_average,
                                       momentum=self.momentum, epsilon=self.epsilon,
                                       dtype=self.dtype)
        if updated is not None:
            self.mean.set_value(updated[0])
            self.var.set_value(updated[1])
        return y


class FC(nnx.Module):
    """A fully connected layer (``layers.fc``): ``kernel`` (in, out) and ``bias``."""

    def __init__(self, in_features: int, layer: arch.Layer, *, dtype: Any, param_dtype: Any,
                 precision: Any, rngs: nnx.Rngs):
        self.kernel = nnx.Param(INITS[layer.init](rngs.params(), (in_features, layer.features),
                                                  param_dtype))
        self.bias = nnx.Param(jnp.zeros((layer.features,), param_dtype))
        self.dtype, self.precision = dtype, precision

    def __call__(self, x: Array, window: tuple[int, int] | None = None) -> Array:
        return layers.fc(x, self.kernel.get_value(), self.bias.get_value(),
                         window=window if x.ndim == 4 else None, dtype=self.dtype,
                         precision=self.precision)


class L2Norm(nnx.Module):
    """SSD's L2Norm (``layers.l2norm``) with its learnable per-channel ``scale``."""

    def __init__(self, num_features: int, *, param_dtype: Any):
        self.scale = nnx.Param(jnp.full((num_features,), layers.L2NORM_INIT_SCALE, param_dtype))

    def __call__(self, x: Array) -> Array:
        return layers.l2norm(x, self.scale.get_value())


class Dropout(nnx.Module):
    """``layers.dropout`` with keys from its own fork of the ``dropout`` stream; ``deterministic``
    as ``nnx.Dropout``'s, set by ``model.train()`` / ``model.eval()``."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = True):
        self.rate, self.deterministic = rate, deterministic
        self.rngs = rngs.dropout.fork()

    def __call__(self, x: Array) -> Array:
        if self.deterministic or self.rate == 0.0:
            return x
        return layers.dropout(x, self.rate, self.rngs())


class _Fields(Plan):
    """Field values alone, to check them (``Plan.validate``) before anything is built."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)


def _field_values(variant: str | None, in_channels: Any, fields: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Every field of a model of ``variant`` given ``fields``, checked as Linen's VGG checks
    them (one-line ValueError; TypeError for a name that is not a field)."""
    unknown = sorted(set(fields) - set(FIELD_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown VGG field(s) {unknown}; fields are "
                        f"{', '.join(FIELD_DEFAULTS)}, in_channels")
    values = dict(FIELD_DEFAULTS)
    if variant is not None:
        values.update(arch.VARIANTS[variant].module_fields())
    values.update(fields)
    _Fields(values).validate()  # before freezing: the errors show the values as given
    if not (isinstance(in_channels, int) and not isinstance(in_channels, bool)
            and in_channels > 0):
        raise ValueError(f"VGG field in_channels (conv1_1's input channels) must be a "
                         f"positive integer, got {in_channels!r}")
    return {**{name: _frozen(value) for name, value in values.items()},
            "in_channels": in_channels}


class VGG(nnx.Module, Plan):
    """VGG (Simonyan & Zisserman 2014) in NHWC as an ``nnx.Module``: ``model(x)``.

    Fields are the Linen ``vgg_flax.VGG``'s, with the same defaults and the same checks
    (``fields.validate_fields``: one-line ValueError), plus ``in_channels`` (conv1_1's input
    channels, which NNX needs when it creates the kernel). ``rngs`` draws the parameters
    (``params`` stream, else ``default``) and seeds dropout (``dropout`` stream); an int is a
    seed; None is a fresh ``nnx.Rngs(0)`` (a shared default object would advance from call to
    call). The output is the Linen module's: logits, the last map (``include_top=False``), or a
    dict of ``taps``.
    """
    variant: str | None = None  # the named classes' arch.VARIANTS key

    def __init__(self, *, in_channels: int = 3, rngs: nnx.Rngs | int | None = None,
                 **fields: Any):
        for name, value in _field_values(self.variant, in_channels, fields).items():
            setattr(self, name, value)
        if rngs is None or isinstance(rngs, int):
            rngs = nnx.Rngs(0 if rngs is None else rngs)
        c = self.in_channels
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for layer in self.layers():
            if layer.kind == "conv":
                setattr(self, layer.name, Conv(c, layer, precision=self.precision,
                                               impl=self.conv, rngs=rngs, **common))
                c = layer.features
            elif layer.kind == "bn":
                setattr(self, layer.name, BatchNorm(c, momentum=self.bn_momentum,
                                                    epsilon=self.bn_epsilon, **common))
            elif layer.kind == "fc":
                window = self.pool_size if layer.reads_map else None
                setattr(self, layer.name, FC(layers.fc_in_features(window, c), layer,
                                             precision=self.precision, rngs=rngs, **common))
                c = layer.features
            elif layer.kind == "dropout":
                setattr(self, layer.name, Dropout(self.dropout_rate, rngs=rngs))
            if layer.name == arch.L2NORM_AFTER and self.l2norm:
                setattr(self, arch.L2NORM_NAME, L2Norm(c, param_dtype=self.param_dtype))

    def fields(self) -> dict[str, Any]:
        """The Linen VGG fields of this model (``in_channels`` aside)."""
        return {name: getattr(self, name) for name in FIELD_DEFAULTS}

    def __call__(self, x: Array):
        self.check_input(x)
        norm = getattr(self, arch.L2NORM_NAME, None) if self.l2norm else None
        return walk(self.layers(), x.astype(self.dtype), self._run, norm, taps=self.taps,
                    average=self.averages)

    def _run(self, layer: arch.Layer, x: Array, relu: bool) -> Array:
        if layer.kind == "conv":
            return getattr(self, layer.name)(x, relu)
        if layer.kind in ("bn", "dropout"):
            return getattr(self, layer.name)(x)
        if layer.kind == "fc":
            window = None
            if layer.reads_map:
                x, window = layers.fc_input(x, self.pool_size, self.dense)
            return getattr(self, layer.name)(x, window)
        return layers.stateless(layer, x, self)


# The named classes: ``VGG16(num_classes=10)`` is ``create("vgg16", num_classes=10)``; a
# variant's fields are data (``arch.VARIANTS``), so a class only names its row.
class VGG11(VGG):
    """VGG-11, the paper's configuration A (torchvision ``vgg11``)."""
    variant = "vgg11"


class VGG11_BN(VGG):
    """VGG-11 with BatchNorm (torchvision ``vgg11_bn``)."""
    variant = "vgg11_bn"


class VGG13(VGG):
    """VGG-13, configuration B (torchvision ``vgg13``)."""
    variant = "vgg13"


class VGG13_BN(VGG):
    """VGG-13 with BatchNorm (torchvision ``vgg13_bn``)."""
    variant = "vgg13_bn"


class VGG16(VGG):
    """VGG-16, configuration D (torchvision ``vgg16``)."""
    variant = "vgg16"


class VGG16_BN(VGG):
    """VGG-16 with BatchNorm (torchvision ``vgg16_bn``)."""
    variant = "vgg16_bn"


class VGG19(VGG):
    """VGG-19, configuration E (torchvision ``vgg19``)."""
    variant = "vgg19"


class VGG19_BN(VGG):
    """VGG-19 with BatchNorm (torchvision ``vgg19_bn``)."""
    variant = "vgg19_bn"


class VGG11_LRN(VGG):
    """VGG-11 with LRN after relu1_1, the paper's A-LRN."""
    variant = "vgg11_lrn"


class VGG16_C(VGG):
    """VGG-16 with 1x1 convolutions, the paper's configuration C."""
    variant = "vgg16_c"


class VGG16_SSD(VGG):
    """SSD300's atrous VGG-16 backbone (conv4_3 L2Norm, conv6, conv7)."""
    variant = "vgg16_ssd"


NAMED_CLASSES: dict[str, type[VGG]] = {cls.variant: cls for cls in (
    VGG11, VGG11_BN, VGG13, VGG13_BN, VGG16, VGG16_BN, VGG19, VGG19_BN, VGG11_LRN, VGG16_C,
    VGG16_SSD)}


def create(name: str, rngs: nnx.Rngs | int | None = None, **fields: Any) -> VGG:
    """The NNX model for ``name`` (``vgg_flax.list_models()``), with any VGG field overridden
    and ``in_channels``; ``rngs`` None is ``nnx.Rngs(0)``.

    The parameters are drawn by one compiled program (``jax.jit``, with
    ``model.init_compiler_options``), as a jitted Linen init is. Constructing a class directly
    (``VGG16(...)``) draws from the same keys one operation at a time, which on CPU compiles one
    threefry program per kernel shape (a tiny vgg11_bn: 21 s against 8 s, measured on a shared
    machine), and rounds a few kernel values differently (1 ulp) from the fused program.

    >>> create("vgg11", num_classes=10, width=0.25, hidden_size=256, pool_size=(1, 1))
    """
    if name not in NAMED_CLASSES:
        raise ValueError(f"unknown VGG {name!r}; choose one of: {', '.join(NAMED_CLASSES)}")
    cls = NAMED_CLASSES[name]
    if rngs is None or isinstance(rngs, int):
        rngs = nnx.Rngs(0 if rngs is None else rngs)
    _field_values(cls.variant, fields.get("in_channels", 3),
                  {k: v for k, v in fields.items() if k != "in_channels"})  # errors untraced
    if isinstance(jnp.zeros(()) + 0, jax.core.Tracer):  # inside a transformation (nnx.jit of
        return cls(rngs=rngs, **fields)  # a sharded init, eval_shape): it compiles the draws
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(**fields)))  # checks the fields
    rngs_graphdef, rngs_state = nnx.split(rngs)

    @functools.partial(jax.jit, compiler_options=linen.init_compiler_options())
    def build(rngs_state):
        draws = nnx.merge(rngs_graphdef, rngs_state)
        return nnx.state(cls(rngs=draws, **fields)), nnx.state(draws)

    state, rngs_state = build(rngs_state)
    nnx.update(rngs, rngs_state)  # the caller's streams advance as an eager build's would
    return nnx.merge(graphdef, state)


def _split(model: VGG) -> tuple[dict[str, Any], dict[str, Any]]:
    return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def to_linen(model: VGG) -> tuple[linen.VGG, dict[str, Any]]:
    """``(module, variables)``: the Linen VGG with this model's fields and its parameters and
    running statistics (the same arrays, no copies), ``module.apply(variables, x)`` equal to
    ``model(x)`` in evaluation mode."""
    params, stats = _split(model)
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = stats
    return linen.VGG(**model.fields()), variables


def load_variables(model: VGG, variables: Mapping[str, Any]) -> VGG:
    """Put Linen ``variables`` (``{"params": ..., "batch_stats": ...}``) into ``model``, in place.
    WeightMismatchError (one line) when a layer of the model is missing or its leaves differ in
    tree or shape; layers the model does not have are left out."""
    params, stats = _split(model)
    want = {"params": params, **({"batch_stats": stats} if stats else {})}
    # Layers this VGG does not have are left out, as Linen's apply ignores them (a classifier's
    # fc6-fc8 under include_top=False, the layers after the deepest tap).
    got = {k: {layer: leaves for layer, leaves in variables[k].items() if layer in want[k]}
           for k in want if isinstance(variables.get(k), Mapping)}
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))):
        module, _ = to_linen(model)
        raise WeightMismatchError(
            "variables do not fit this VGG: "
            f"{linen.variables_mismatch(module, got) or 'a different tree'}")
    merged: dict[str, dict[str, Any]] = {}
    for collection in got.values():
        for layer, leaves in collection.items():
            merged.setdefault(layer, {}).update(leaves)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
    return model


def to_nnx(module: linen.VGG, variables: Mapping[str, Any], seed: int = 0) -> VGG:
    """The native NNX model with the Linen ``module``'s fields holding ``variables``.

    No forward pass runs and nothing is drawn: the model is built abstractly (``nnx.eval_shape``)
    and filled; ``jax.Array`` variables are attached as they are, host arrays are copied to the
    default device. ``seed`` seeds dropout. ``in_channels`` is conv1_1's kernel's.
    """
    fields = {name: getattr(module, name) for name in FIELD_DEFAULTS}
    try:
        in_channels = int(variables["params"]["conv1_1"]["kernel"].shape[2])
    except (KeyError, TypeError, IndexError, AttributeError):
        raise WeightMismatchError("variables have no params/conv1_1/kernel: not a VGG's "
                                  "variables") from None
    model = nnx.eval_shape(lambda: VGG(in_channels=in_channels, **fields))
    load_variables(model, on_device(dict(variables)))
    dropout_rngs = nnx.Rngs(dropout=seed)
    for layer in model.layers():
        if layer.kind == "dropout":
            getattr(model, layer.name).rngs = dropout_rngs.dropout.fork()
    return model


def pretrained(name: str, weights: str | None = None, **kwargs: Any) -> VGG:
    """``vgg_flax.pretrained(name, weights, **kwargs)`` (published ImageNet weights; the same
    fields, ``cache_dir``, ``progress`` and ``seed``) as a native NNX model."""
    from vgg_flax.published import pretrained as linen_pretrained  # network and torch I/O
    module, variables = linen_pretrained(name, weights, **kwargs)
    return to_nnx(module, variables, seed=kwargs.get("seed", 0))
