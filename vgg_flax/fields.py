"""What each field of ``vgg_flax.VGG`` may hold: one table, checked whenever a VGG is built.

``VGG.__post_init__`` runs ``validate_fields``, so ``create``, ``clone``, ``load``, the
converter's ``--set`` and the trainer's ``model_overrides`` all refuse a bad value in one line
naming the field, the value and what is allowed.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
from jax import lax

from vgg_flax import onednn


# -- what each VGG field may hold: one table, checked where a VGG is built -----------------------
class FieldRule(NamedTuple):
    check: Callable[[Any], bool]
    allowed: str   # what the value must be, as an error message says it
    doc: str       # what the field is


# (``type(v) is int`` first: these run whenever a VGG is built or cloned, and an isinstance
# against the numbers ABCs costs a microsecond each.)
def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _is_finite(v) -> bool:
    return ((type(v) in (int, float) or (isinstance(v, numbers.Real) and not isinstance(v, bool)))
            and math.isfinite(v))


def _positive_int(v) -> bool:
    return _is_int(v) and v > 0


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    return lambda v: (_is_finite(v) and (v > low if low_open else v >= low)
                      and (v < high if high_open else v <= high))


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_pair(v) -> bool:  # lists too: JSON (train_config.json, vgg_flax.json) has no tuples
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_positive_int(x) for x in v)


def _is_cfg(v) -> bool:
    if not isinstance(v, (tuple, list)):
        return False
    layers = [t for t in v if not (isinstance(t, str) and t in ("M", "C", "LRN"))]
    return len(layers) > 0 and all(_positive_int(t) or _is_pair(t) for t in layers)


DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=64)
def _dtype_name(v) -> str | None:
    try:
        return jnp.dtype(v).name
    except TypeError:
        return None


def _is_dtype(v) -> bool:
    try:
        return v is not None and _dtype_name(v) in DTYPES
    except TypeError:  # unhashable
        return False


def _is_precision(v) -> bool:
    if isinstance(v, (tuple, list)):
        return len(v) == 2 and all(p is not None and _is_precision(p) for p in v)
    if v is None or isinstance(v, (lax.Precision, lax.DotAlgorithmPreset, lax.DotAlgorithm)):
        return True
    try:
        return isinstance(v, str) and lax.Precision(v) is not None
    except ValueError:
        return False


def _is_taps(v) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(t, str) for t in v)


def _one_of(*names: str) -> str:
    return ", ".join(map(repr, names[:-1])) + f" or {names[-1]!r}"


FIELDS: dict[str, FieldRule] = {
    "cfg": FieldRule(_is_cfg, "a non-empty sequence of channel counts, (channels, kernel) "
                     "pairs, 'M', 'C' and 'LRN'", "the layer list, as in arch.CFGS"),
    "batch_norm": FieldRule(_is_bool, "True or False", "BatchNorm after every convolution"),
    "head": FieldRule(lambda v: v in ("fc", "ssd"), _one_of("fc", "ssd"),
                      "classifier or SSD's atrous tail"),
    "num_classes": FieldRule(_positive_int, "a positive integer", "outputs of fc8"),
    "include_top": FieldRule(_is_bool, "True or False", "whether the head runs"),
    "dropout_rate": FieldRule(_number(0, 1, high_open=True), "a finite number in [0, 1)",
                              "dropout after fc6 and fc7"),
    "hidden_size": FieldRule(_positive_int, "a positive integer",
                             "fc6/fc7 width, conv6/conv7 for SSD"),
    "width": FieldRule(_number(0, low_open=True), "a finite number > 0", "channel multiplier"),
    "pool_size": FieldRule(_is_pair, "two positive integers (H, W), e.g. (7, 7)",
                           "pool5's adaptive average pool output"),
    "l2norm": FieldRule(_is_bool, "True or False", "SSD's L2Norm branch on relu4_3"),
    "dense": FieldRule(_is_bool, "True or False", "fc6-fc8 as convolutions"),
    "taps": FieldRule(_is_taps, "a tuple of layer names, e.g. ('relu1_2', 'relu4_3')",
                      "activations to return"),
    "bn_momentum": FieldRule(_number(0, 1), "a finite number in [0, 1]",
                             "torch's BatchNorm momentum"),
    "bn_epsilon": FieldRule(_number(0, low_open=True), "a finite number > 0", "BatchNorm epsilon"),
    "lrn_size": FieldRule(_positive_int, "a positive integer", "LRN window in channels"),
    "lrn_alpha": FieldRule(_number(0), "a finite number >= 0", "LRN alpha"),
    "lrn_beta": FieldRule(_number(0), "a finite number >= 0", "LRN beta"),
    "lrn_k": FieldRule(_number(0, low_open=True), "a finite number > 0", "LRN k"),
    "dtype": FieldRule(_is_dtype, "float32, bfloat16 or float16", "compute dtype"),
    "param_dtype": FieldRule(_is_dtype, "float32, bfloat16 or float16", "parameter dtype"),
    "precision": FieldRule(_is_precision, "None, a jax.lax.Precision or its name "
                           "('highest', ...), or a pair of them", "matmul/convolution precision"),
    "conv": FieldRule(lambda v: isinstance(v, str) and v in onednn.IMPLS, _one_of(*onednn.IMPLS),
                      "convolution implementation"),
}


def field_problem(name: str, value: Any) -> str | None:
    """None when ``value`` may be VGG field ``name``, else one line: the field, what it is,
    what it must be and the value given. (Unknown names are ``create``'s TypeError.)"""
    rule = FIELDS[name]
    if rule.check(value):
        return None
    return f"{name} ({rule.doc}) must be {rule.allowed}, got {value!r}"


def validate_fields(fields: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) for the first value in ``fields`` that its VGG field may not
    hold. ``VGG`` runs this whenever one is built (``create``, ``clone``, ``load``)."""
    for name, value in fields.items():
        problem = field_problem(name, value)
        if problem is not None:
            raise ValueError(f"VGG field {problem}")
