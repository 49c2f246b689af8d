"""torch <-> Flax weight mapping as pure functions, by explicit name tables.

The only place (with ``convert/``) that knows NCHW/OIHW. Convolutions OIHW <-> HWIO, linear
layers (out, in) <-> (in, out), and fc6's columns permuted once from torch's (C, H, W) flatten
order to NHWC's (H, W, C), so the Flax model flattens pool5 without a transpose.

Variables handed to a user are ``jax.Array``s on the default device (``on_device``): numpy
leaves would be copied to the device again by every call of a jitted ``apply``.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from vgg_flax import arch, registry, torch_io
from vgg_flax.errors import WeightFileError, WeightMismatchError
from vgg_flax.model import VGG, abstract_variables


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    collection: str            # "params" or "batch_stats"
    path: tuple[str, str]      # (layer name, leaf name) in that collection
    kind: str                  # "conv", "linear", "fc6" or "vector"


def _module(name_or_module: str | VGG, overrides: dict[str, Any]) -> VGG:
    if isinstance(name_or_module, VGG):
        return name_or_module.clone(**overrides) if overrides else name_or_module
    return registry.create(name_or_module, **overrides)


def _layer_entries(layer: arch.Layer, prefix: str) -> list[Entry]:
    if layer.kind == "conv":
        return [Entry(f"{prefix}.weight", "params", (layer.name, "kernel"), "conv"),
                Entry(f"{prefix}.bias", "params", (layer.name, "bias"), "vector")]
    if layer.kind == "bn":
        return [Entry(f"{prefix}.weight", "params", (layer.name, "scale"), "vector"),
                Entry(f"{prefix}.bias", "params", (layer.name, "bias"), "vector"),
                Entry(f"{prefix}.running_mean", "batch_stats", (layer.name, "mean"), "vector"),
                Entry(f"{prefix}.running_var", "batch_stats", (layer.name, "var"), "vector")]
    if layer.kind == "fc":
        return [Entry(f"{prefix}.weight", "params", (layer.name, "kernel"),
                      "fc6" if layer.reads_map else "linear"),
                Entry(f"{prefix}.bias", "params", (layer.name, "bias"), "vector")]
    return []


def torch_entries(module: VGG) -> list[Entry]:
    """The name table for ``module``, in torch's state_dict order.

    Classifiers use torchvision's ``VGG`` keys (``features.N``, ``classifier.N``); the SSD head
    uses torchvision's ``SSDFeatureExtractorVGG`` keys (``scale_weight``, ``features.N`` up to
    relu4_3, ``extra.0.N`` from pool4 on, ``extra.0.K.N`` for the atrous tail).
    """
    feats = arch.features_layers(module.cfg, module.batch_norm, module.width)
    entries: list[Entry] = []
    if module.head == "ssd":
        if module.l2norm:
            entries.append(Entry("scale_weight", "params", (arch.L2NORM_NAME, "scale"), "vector"))
        pool4 = next(layer.torch_index for layer in feats if layer.name == "pool4")
        for layer in feats:
            i = layer.torch_index
            entries += _layer_entries(layer, f"features.{i}" if i < pool4 else f"extra.0.{i - pool4}")
        if module.include_top:
            tail = feats[-1].torch_index - pool4 + 1
            for layer in arch.ssd_head_layers(module.hidden_size, module.width):
                entries += _layer_entries(layer, f"extra.0.{tail}.{layer.torch_index}")
        return entries
    for layer in feats:
        entries += _layer_entries(layer, f"features.{layer.torch_index}")
    if module.include_top:
        for layer in arch.fc_head_layers(module.hidden_size, module.num_classes):
            entries += _layer_entries(layer, f"classifier.{layer.torch_index}")
    return entries


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy view of a tensor or array (no copy where none is needed)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        return torch_io.torch_to_numpy(value)
    return np.asarray(value)


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: jax on CPU can then use the memory as it is
    (``device_put(..., may_alias=True)``) instead of copying the model once more."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + n].view(dtype).reshape(shape)


def on_device(variables: Any, *, consume: bool = False) -> Any:
    """``variables`` with every leaf a ``jax.Array`` on the default device, one leaf at a time.

    ``jax.Array`` leaves stay as they are. Host arrays are copied, so a caller's numpy arrays
    never alias an (immutable) ``jax.Array``. ``consume=True`` is for arrays the caller hands
    over and nobody else holds: each host leaf is replaced in ``variables`` (nested dicts) once
    on the device, so the model is never held twice, and on CPU JAX uses 64-byte-aligned
    ones (``empty_aligned``) in place. float64 becomes float32 unless ``jax_enable_x64``.
    """
    if not consume:
        return jax.tree.map(
            lambda a: a if isinstance(a, jax.Array) else jax.device_put(a, may_alias=False),
            variables)
    for k, v in variables.items():
        if isinstance(v, Mapping):
            on_device(v, consume=True)
        elif not isinstance(v, jax.Array):
            variables[k] = jax.device_put(v, may_alias=True)
        del v
    return variables


def _torch_shape(entry: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if entry.kind == "conv":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if entry.kind in ("linear", "fc6"):
        return flax_shape[::-1]
    return flax_shape


def torch_to_flax_array(entry: Entry, w: np.ndarray, module: VGG) -> np.ndarray:
    if entry.kind == "conv":
        return w.transpose(2, 3, 1, 0)
    if entry.kind == "linear":
        return w.T
    if entry.kind == "fc6":
        # (out, C*ph*pw) -> (ph*pw*C, out), in tiles of 16 output units: one strided copy of
        # the whole 400 MB fc6 misses the cache on every element (0.8-1.6 s; tiled 0.22 s)
        ph, pw = module.pool_size
        out = w.shape[0]
        src = w.reshape(out, -1, ph, pw)
        dst = empty_aligned((ph, pw, src.shape[1], out), w.dtype)
        for i in range(0, out, 16):
            dst[..., i:i + 16] = src[i:i + 16].transpose(2, 3, 1, 0)
        return dst.reshape(-1, out)
    return w


def flax_to_torch_array(entry: Entry, w: np.ndarray, module: VGG) -> np.ndarray:
    if entry.kind == "conv":
        return w.transpose(3, 2, 0, 1)
    if entry.kind == "linear":
        return w.T
    if entry.kind == "fc6":
        # the inverse, gathering 64 output units at a time: a block stays in cache while it is
        # transposed, where one unit at a time strides over all of fc6 per unit (twice as slow)
        ph, pw = module.pool_size
        out = w.shape[1]
        src = w.reshape(ph, pw, -1, out)
        dst = np.empty((out, src.shape[2], ph, pw), w.dtype)
        for i in range(0, out, 64):
            dst[i:i + 64] = np.ascontiguousarray(src[..., i:i + 64]).transpose(3, 2, 0, 1)
        return dst.reshape(out, -1)
    return w


def identify(state_dict: Mapping[str, Any]) -> str | None:
    """The variant whose torch key layout ``state_dict`` has (any num_classes), or None."""
    keys = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    shapes = {k: tuple(_shape(state_dict[k])) for k in keys}
    for name in registry.list_models():
        module = registry.create(name)
        expected = expected_torch_shapes(module, in_channels_of(state_dict, module))
        if set(expected) != keys:
            continue
        if all(shapes[k] == s for k, s in expected.items() if not k.startswith("classifier.6")):
            return name
    return None


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def in_channels_of(state_dict: Mapping[str, Any], module: VGG) -> int:
    first = torch_entries(module)[0 if module.head == "fc" or not module.l2norm else 1]
    w = state_dict.get(first.torch_key)
    return int(_shape(w)[1]) if w is not None and len(_shape(w)) == 4 else 3


def expected_torch_shapes(module: VGG, in_channels: int) -> dict[str, tuple[int, ...]]:
    abstract = abstract_variables(module, in_channels)
    out = {}
    for e in torch_entries(module):
        layer, leaf = e.path
        out[e.torch_key] = _torch_shape(e, tuple(abstract[e.collection][layer][leaf].shape))
    return out


def from_torch(state_dict: Mapping[str, Any], name: str | VGG, *, dtype: Any = None,
               **overrides: Any) -> dict[str, Any]:
    """torch state_dict (tensors or numpy arrays) -> Flax variables for VGG ``name``. A training
    checkpoint holding one (under ``state_dict``/``model``, as the converter reads) works too.

    ``overrides`` are VGG fields that change shapes (``num_classes=10``, ``width=0.25``...).
    Strict: every missing, unexpected and wrongly shaped key is reported in one
    ``WeightMismatchError``, with the variant the weights look like when it is another one.
    Leaves are ``jax.Array``s on the default device, of the given arrays' dtype unless ``dtype``
    is given (float64: see ``on_device``). ``num_batches_tracked`` is dropped.
    """
    try:
        state_dict = torch_io.state_dict_in(state_dict, "from_torch's state_dict")
    except WeightFileError as err:
        raise WeightMismatchError(str(err)) from None
    module = _module(name, overrides)
    check_fit(state_dict, module, name if isinstance(name, str) else "the given module")
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    variables: dict[str, Any] = {}
    for e in torch_entries(module):
        src = _to_numpy(given[e.torch_key])
        w = torch_to_flax_array(e, src, module)
        want = jax.dtypes.canonicalize_dtype(w.dtype if dtype is None else dtype)
        # Each leaf is converted into memory of its own (never a view of the caller's tensors,
        # which may change later) that jax on CPU uses in place: one copy of the model.
        if (np.may_share_memory(w, src) or w.dtype != want or not w.flags.c_contiguous
                or w.ctypes.data % 64):
            own = empty_aligned(w.shape, want)
            np.copyto(own, w, casting="unsafe")
            w = own
        del src
        variables.setdefault(e.collection, {}).setdefault(e.path[0], {})[e.path[1]] = \
            jax.device_put(w, may_alias=True)
        del w
    return variables


def fit_problems(state_dict: Mapping[str, Any], module: VGG
                 ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrongly shaped) keys of ``state_dict`` for ``module``; values need
    only a ``shape`` (tensors, arrays, or lazily read file entries). ``num_batches_tracked`` is
    ignored."""
    expected = expected_torch_shapes(module, in_channels_of(state_dict, module))
    given = {k: _shape(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k}: got {given[k]}, expected {s}" for k, s in expected.items()
             if k in given and given[k] != s]
    return missing, unexpected, wrong


def check_fit(state_dict: Mapping[str, Any], module: VGG, label: str) -> None:
    """Raise ``WeightMismatchError`` listing every missing, unexpected and wrongly shaped key at
    once (and the variant the weights look like) unless ``state_dict`` fits ``module`` exactly."""
    missing, unexpected, wrong = fit_problems(state_dict, module)
    if missing or unexpected or wrong:
        raise WeightMismatchError(mismatch_message(label, state_dict, module, missing,
                                                   unexpected, wrong))


def mismatch_message(label, state_dict, module, missing, unexpected, wrong) -> str:
    def some(items, sep=", "):
        return sep.join(items[:6]) + (" ..." if len(items) > 6 else "")

    head = f"weights do not fit {label}"
    guess = identify(state_dict)
    if guess is not None and guess != label:
        head += f" (they look like {guess} weights: convert them as {guess})"
    elif not missing and not unexpected and all(w.startswith("classifier.6") for w in wrong):
        classes = _shape(state_dict["classifier.6.weight"])[0]
        head += f" (the head has {classes} classes: pass num_classes={classes})"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {some(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrongly shaped: {some(wrong, '; ')}")
    return head + ": " + "; ".join(parts)


def iter_torch_arrays(variables: Mapping[str, Any], module: VGG, *, consume: bool = False
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy array) pairs of ``module``'s state_dict, in torch's order.

    ``consume=True`` removes each Flax leaf from ``variables`` once converted, so a caller that
    drops the arrays it is given never holds the model twice. BatchNorm's
    ``num_batches_tracked`` (not kept in Flax) comes back as 0. KeyError if a leaf is missing.
    """
    for e in torch_entries(module):
        layer = variables[e.collection][e.path[0]]
        leaf = layer.pop(e.path[1]) if consume else layer[e.path[1]]
        yield e.torch_key, np.ascontiguousarray(flax_to_torch_array(e, np.asarray(leaf), module))
        del leaf
        if e.torch_key.endswith("running_var"):
            yield e.torch_key[: -len("running_var")] + "num_batches_tracked", np.array(0, np.int64)


def to_torch(variables: Mapping[str, Any], name: str | VGG, *, as_numpy: bool = False,
             **overrides: Any) -> "OrderedDict[str, Any]":
    """Flax variables -> torch state_dict that torchvision's module loads with strict=True.

    BatchNorm's ``num_batches_tracked`` (not kept in Flax) is restored as 0. Returns torch
    tensors, or numpy arrays with ``as_numpy=True`` (no torch needed).
    """
    module = _module(name, overrides)
    try:
        sd: OrderedDict[str, Any] = OrderedDict(iter_torch_arrays(variables, module))
    except KeyError as err:
        raise WeightMismatchError(f"variables lack {err} needed by {name}: were they made for "
                                  "another VGG variant or with other overrides?") from None
    if as_numpy:
        return sd
    return OrderedDict((k, torch_io.numpy_to_torch(v)) for k, v in sd.items())
