"""Library-layout torch tensors -> Flax variables: the strict fit check (``weights.check_fit``,
with the CLI flags that would make the weights fit) and the block-by-block conversion."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from vgg_flax import registry, torch_io, weights
from vgg_flax.convert import layouts, sources
from vgg_flax.errors import ConversionError, WeightFileError, WeightMismatchError
from vgg_flax.convert.memory import empty_aligned
from vgg_flax.fields import DTYPES as FLOAT_DTYPES
from vgg_flax.torch_io import Tensor
from vgg_flax.weights import on_device

DTYPES = ("float32", "float16", "bfloat16", "keep")
CHUNK_BYTES = 32 << 20  # row blocks for large tensors: bounds the transient copy


def suggest_overrides(tensors: Mapping[str, Tensor], name: str) -> dict[str, Any] | None:
    """The VGG fields (num_classes, hidden_size, pool_size, width) that make ``tensors`` fit
    ``name``, read from their shapes; None when no such fields exist."""
    module = registry.create(name)
    first = tensors.get("features.0.weight")
    if first is None or len(first.shape) != 4:
        return None
    fields: dict[str, Any] = {}
    if first.shape[0] != 64:
        fields["width"] = first.shape[0] / 64
    fc6 = tensors.get("classifier.0.weight")
    if module.head == "fc" and fc6 is not None and len(fc6.shape) == 2:
        convs = [k for k in tensors if k.startswith("features.") and k.split(".")[1].isdigit()
                 and len(tensors[k].shape) == 4]
        c_last = tensors[max(convs, key=lambda k: int(k.split(".")[1]))].shape[0]
        hidden, fan_in = fc6.shape
        side = int(round((fan_in // max(c_last, 1)) ** 0.5))
        if side < 1 or side * side * c_last != fan_in:
            return None
        if hidden != 4096:
            fields["hidden_size"] = hidden
        if side != 7:
            fields["pool_size"] = (side, side)
        fc8 = tensors.get("classifier.6.weight")
        if fc8 is not None and fc8.shape[0] != 1000:
            fields["num_classes"] = fc8.shape[0]
    if not fields:
        return None
    try:
        candidate = registry.create(name, **fields)
    except (TypeError, ValueError):  # fields create() refuses: no suggestion
        return None
    if any(weights.fit_problems(tensors, candidate)):
        return None
    return fields


def flags(fields: Mapping[str, Any]) -> str:
    """The CLI flags that set ``fields``."""
    parts = []
    for k, v in fields.items():
        if k == "num_classes":
            parts.insert(0, f"--num-classes {v}")
        else:
            v = ",".join(map(str, v)) if isinstance(v, tuple) else v
            parts.append(f"--set {k}={v}")
    return " ".join(parts)


def check_fit_with_flags(tensors: Mapping[str, Tensor], name: str, module,
                         given: Mapping[str, Any]) -> None:
    """Raise ConversionError (one line, with the fix) unless ``tensors`` fit ``module`` exactly:
    ``weights.check_fit``'s message, or the flags that make them fit when those can be read."""
    try:
        weights.check_fit(tensors, module, name)
    except WeightMismatchError as err:
        suggestion = suggest_overrides(tensors, name)
        if suggestion and suggestion != {k: given.get(k) for k in suggestion}:
            what = ", ".join(f"{k}={v}" for k, v in suggestion.items())
            raise ConversionError(f"these {name} weights have other shapes ({what}, read from "
                                  f"the weights): pass {flags(suggestion)}") from None
        raise ConversionError(str(err).replace("pass num_classes=", "pass --num-classes ")) from None


def out_dtype(dtype: str, tensors: Mapping[str, Tensor]) -> np.dtype:
    if dtype == "keep":
        floats = {v.dtype for v in tensors.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"}
        if len(floats) > 1:
            raise ConversionError(f"--dtype keep: the weights mix {sorted(d.name for d in floats)}; "
                                  "pick one with --dtype float32|float16|bfloat16")
        kept = floats.pop() if floats else np.dtype(np.float32)
        if kept.name not in FLOAT_DTYPES:  # float64: no VGG param_dtype (fields.FIELDS)
            raise ConversionError(f"--dtype keep: the weights are {kept.name}, which a VGG does "
                                  "not hold; pick --dtype float32|float16|bfloat16")
        return kept
    return torch_io.np_dtype(dtype)


def nonfinite_error(where: str, counts: Mapping[str, int]) -> ConversionError:
    """Weights holding NaN or inf (a diverged run, a damaged file): one line naming them."""
    named = ", ".join(f"{k} ({n:,})" for k, n in list(counts.items())[:4])
    more = f" and {len(counts) - 4} more tensors" if len(counts) > 4 else ""
    return ConversionError(f"{where} holds NaN or inf values in {named}{more}; these weights "
                           "are broken (a diverged training run, or a damaged file): nothing "
                           "written")


def map_to_flax(tensors: Mapping[str, Tensor], module, dtype: np.dtype,
                progress: bool = True, where: str = "the weights") -> dict[str, Any]:
    """Flax variables (numpy) for ``module`` from library-layout tensors, converting each tensor in
    row blocks and releasing its file pages, so the source is never resident next to the copy.
    Params take ``dtype``; BatchNorm statistics stay float32. NaN or inf anywhere:
    ConversionError naming the tensors (``where`` names their source)."""
    from tqdm.auto import tqdm
    entries = weights.torch_entries(module)
    variables: dict[str, Any] = {}
    total = sum(tensors[e.torch_key].nbytes for e in entries)
    nonfinite: dict[str, int] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting",
              disable=None if progress else True,  # None: only on a terminal
              leave=False) as bar:
        for e in entries:
            src = tensors[e.torch_key]
            want = dtype if e.collection == "params" else np.dtype(np.float32)
            rows = src.shape[0] if src.shape else 1
            row_bytes = max(src.nbytes // max(rows, 1), 1)
            step = max(1, CHUNK_BYTES // row_bytes)
            first = weights.torch_to_flax_array(e, np.zeros((1,) + src.shape[1:], src.dtype), module)
            out = empty_aligned(first.shape[:-1] + (rows,), want)
            for r0 in range(0, rows, step):
                block = weights.torch_to_flax_array(e, src.rows(slice(r0, r0 + step)), module)
                out[..., r0:r0 + step] = block.astype(want, copy=False)
                bad = block.size - np.count_nonzero(np.isfinite(block))
                if bad:
                    nonfinite[e.torch_key] = nonfinite.get(e.torch_key, 0) + int(bad)
                bar.update(block.nbytes)
            src.release()
            variables.setdefault(e.collection, {}).setdefault(e.path[0], {})[e.path[1]] = out
    if nonfinite:
        raise nonfinite_error(where, nonfinite)
    return variables


@dataclasses.dataclass
class Prepared:
    name: str
    module: Any
    fields: dict[str, Any]            # VGG field overrides (num_classes, width ...)
    source: sources.Source
    file: torch_io.WeightFile
    tensors: dict[str, Tensor]        # library layout, lazily read
    dtype: np.dtype
    notes: list[str]


def prepare(name: str, weights: str | os.PathLike | None = None, *, num_classes: int | None = None,
            overrides: Mapping[str, Any] | None = None, dtype: str = "float32",
            ssd_from_classifier: bool = False, ssd_features_only: bool = False, seed: int = 0,
            progress: bool = True) -> Prepared:
    """Open and check everything before any output is written (all errors: ConversionError)."""
    module, fields = sources.build_module(name, num_classes, overrides)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConversionError(f"--seed {seed}: must be an integer in [0, 2**63)")
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = sources.resolve_weights(name, weights, progress)
    if source.enum and source.enum.endswith("IMAGENET1K_FEATURES"):
        if name != registry.SSD_NAME:
            raise ConversionError(f"{source.enum} holds no valid classifier (torchvision: "
                                  f"features only); convert it as {registry.SSD_NAME}, or use "
                                  "IMAGENET1K_V1")
        if not ssd_from_classifier:
            ssd_features_only = True
    try:
        wf = torch_io.open_weights(source.path)
    except WeightFileError as err:
        raise ConversionError(str(err)) from None
    tensors, notes = layouts.to_library_layout(
        wf, name, module, ssd_from_classifier=ssd_from_classifier,
        ssd_features_only=ssd_features_only, seed=seed)
    bad = sorted({k for k, v in tensors.items() if v.dtype.kind not in "f" and v.dtype.name != "bfloat16"})
    if bad:
        raise ConversionError(f"tensors {', '.join(bad[:4])} are not floating point "
                              f"({tensors[bad[0]].dtype}); these are not VGG weights")
    check_fit_with_flags(tensors, name, module, fields)
    dt = out_dtype(dtype, tensors)
    src_dtypes = sorted({v.dtype.name for v in tensors.values()})
    if dt.name != "float32" or src_dtypes != ["float32"]:
        notes.append(f"weights {'/'.join(src_dtypes)} -> {dt.name} (BatchNorm statistics float32)")
    if dt != np.float32:
        import jax.numpy as jnp
        fields["param_dtype"] = dt.name
        module = module.clone(param_dtype=jnp.dtype(dt.name))
    return Prepared(name, module, fields, source, wf, tensors, dt, notes)


def load_torch_weights(name: str, weights: str | os.PathLike | None = None, **kwargs):
    """(module, variables) for VGG ``name`` from a torch weights file or torchvision's weights.

    ``kwargs``: num_classes, overrides (VGG fields), dtype, ssd_from_classifier,
    ssd_features_only, seed, progress. Raises ConversionError for any bad input. The variables
    are ``jax.Array``s on the default device (on CPU, in ``map_to_flax``'s memory: no copy).
    """
    p = prepare(name, weights, **kwargs)
    variables = map_to_flax(p.tensors, p.module, p.dtype, kwargs.get("progress", True))
    return p.module, on_device(variables, consume=True)
