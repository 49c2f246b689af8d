"""The two whole jobs: torch weights -> a verified Flax file, and back."""
from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vgg_flax import registry, torch_io, weights
from vgg_flax.convert import atomic, formats, verify as V
from vgg_flax.errors import ConversionError
from vgg_flax.convert.mapping import (Prepared, flags, map_to_flax, nonfinite_error, prepare,
                                      suggest_overrides)
from vgg_flax.model import variables_mismatch
from vgg_flax.convert.memory import mb, peak_rss_bytes, release_memory
from vgg_flax.convert.sources import check_name


@dataclasses.dataclass
class Summary:
    name: str
    num_params: int
    source: str
    source_bytes: int
    out: Path
    fmt: str
    out_bytes: int
    seconds: float
    peak_rss: int
    verification: V.Verification | None
    notes: list[str]

    def lines(self) -> list[str]:
        lines = []
        if self.verification is not None:
            lines.append(self.verification.line())
        if self.verification is None or self.verification.ok:
            dest = f"{self.out} ({self.fmt}, {mb(self.out_bytes)})"
        else:
            dest = f"nothing written to {self.out} (verification failed)"
        lines.append(f"{self.name}: {self.num_params:,} parameters, {self.source} "
                     f"({mb(self.source_bytes)}) -> {dest} in {self.seconds:.1f} s, "
                     f"peak RSS {mb(self.peak_rss)}")
        return lines


def check_verify_args(rtol: float, verify_batch: int, images: Sequence[Any],
                      verify_outputs: bool) -> None:
    """The verification arguments, before any work: ConversionError (one line) otherwise."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) \
            or rtol < 0:
        raise ConversionError(f"--rtol {rtol}: the tolerance (max |diff| / max |output|) must "
                              "be a finite number >= 0, e.g. 1e-4")
    if isinstance(verify_batch, bool) or not isinstance(verify_batch, int) or verify_batch < 0:
        raise ConversionError(f"--verify-batch {verify_batch}: must be an integer >= 0 (seeded "
                              "random inputs besides --image)")
    if verify_outputs and verify_batch == 0 and not images:
        raise ConversionError("--verify-batch 0 and no --image leave nothing to verify on; pass "
                              "a positive --verify-batch, --image FILE, or --no-verify")


def _num_params(variables) -> int:
    return int(sum(a.size for _, a in formats.flatten(variables.get("params", {}))))


def _reference_tensors(prep: Prepared) -> V.TorchWeights:
    """The library-layout tensors as torch tensors, rounded to the output dtype and widened to
    float32 (torch's reference runs in fp32); mmapped, so no copy for float32 files."""
    import torch
    out = V.TorchWeights()
    for k, v in prep.tensors.items():
        t = v.torch()
        if prep.dtype.name != "float32":
            t = t.to(getattr(torch, prep.dtype.name))
        out[k] = t.float() if t.dtype != torch.float32 else t
        if v.mmapped and out[k] is t and v.torch() is t:
            out.file_backed.append(k)
    return out


def _written_error(path: Path, err: OSError) -> ConversionError:
    """OSError while writing (disk full, permissions changed meanwhile): one line."""
    return ConversionError(f"cannot write {path} ({torch_io.short_error(err)}); free space or "
                           "pick another --out")


def torch_to_flax(name: str, weights: str | os.PathLike | None = None,
                  out: str | os.PathLike | None = None, *, fmt: str | None = None,
                  verify_outputs: bool = True, images: Sequence[str | os.PathLike] = (),
                  force: bool = False, rtol: float = 1e-4, verify_batch: int = 4,
                  progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                  **prepare_kwargs) -> Summary:
    """Convert torch weights for VGG ``name`` and write them to ``out`` (orbax, safetensors or
    msgpack), atomically, verified against torchvision's model.

    Raises ConversionError on bad input (nothing written). When verification is over
    tolerance the output is not written and the returned Summary's ``verification.ok`` is False.
    """
    start = time.perf_counter()
    check_verify_args(rtol, verify_batch, images, verify_outputs)
    out_path = Path(out) if out is not None else None
    fmt = formats.format_for(out_path, fmt)
    out_path = out_path or formats.default_out(name, fmt)
    atomic.check_out(out_path, force)
    check_name(name)
    prep = prepare(name, weights, progress=progress, **prepare_kwargs)
    for n in prep.notes:
        log(f"note: {n}")
    in_channels = prep.tensors["features.0.weight"].shape[1]
    # Inputs (and --image files) are read before any work, so a bad image fails fast.
    x = V.verification_inputs(name, prep.module, in_channels, images, verify_batch) \
        if verify_outputs else None
    variables = map_to_flax(prep.tensors, prep.module, prep.dtype, progress, prep.source.label)
    num_params = _num_params(variables)
    extra = {"converted_from": {"source": prep.source.label, "notes": prep.notes}}
    result = None
    with atomic.staged(out_path, functools.partial(_written_error, out_path)) as tmp:
        with atomic.interrupt_after():
            formats.write_flax(tmp, variables, name, prep.module, fmt, extra)
        release_memory()
        if verify_outputs:
            # The Flax side on the converted arrays in place (no second copy), then the torch
            # side once they are freed; the file is then checked against their digests.
            flax_out = V.flax_outputs(prep.module, variables, x, V.output_names(prep.module))
            written = formats.digests(variables) if fmt != "orbax" else formats.shapes(variables)
        del variables
        gc.collect()  # jax's aliases of the arrays sit in reference cycles
        release_memory()
        if verify_outputs:
            result = V.verify(name, prep.module, lambda: _reference_tensors(prep), None,
                              in_channels=in_channels, rtol=rtol, x=x, flax_out=flax_out)
            formats.check_written(tmp, fmt, name, prep.fields, written)
            result.readback = fmt != "orbax"
        atomic.settle(tmp, out_path, force, result)
    return Summary(name, num_params, prep.source.label, prep.file.size, out_path, fmt,
                   atomic.path_size(out_path) if out_path.exists() else 0,
                   time.perf_counter() - start, peak_rss_bytes(), result, prep.notes)


def _torch_side(path: Path) -> Callable[[], V.TorchWeights]:
    """The torch state_dict written at ``path``, memory-mapped, as verification's torch side."""
    def load() -> V.TorchWeights:
        out = V.TorchWeights()
        for k, t in torch_io.open_weights(path).items():
            if k.endswith("num_batches_tracked"):
                continue
            raw = t.torch()
            out[k] = raw.float()
            if t.mmapped and out[k] is raw:
                out.file_backed.append(k)
        return out
    return load


def _misfit_message(src: Path, name: str, variables, mismatch: str) -> str:
    """One line for Flax variables of other shapes than ``name``'s module: the flags that make
    them fit when their shapes say so (read as torch shapes), else the leaves that differ."""
    fix = "pass --name, --num-classes and --set with the fields they were made with"
    try:
        shapes = {}
        for e in weights.torch_entries(registry.create(name)):
            leaf = variables[e.collection][e.path[0]][e.path[1]]
            shapes[e.torch_key] = _Shaped(weights._torch_shape(e, tuple(leaf.shape)))
        suggestion = suggest_overrides(shapes, name)
    except (KeyError, TypeError, AttributeError, ValueError):
        suggestion = None
    if suggestion:
        return (f"{src} holds {name} weights made with other fields (read from their shapes): "
                f"pass {flags(suggestion)}")
    return f"{src} does not hold {name} weights of these shapes ({mismatch}); {fix}"


@dataclasses.dataclass
class _Shaped:
    shape: tuple[int, ...]


def flax_to_torch(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                  verify_outputs: bool = True, name: str | None = None,
                  overrides: Mapping[str, Any] | None = None, rtol: float = 1e-4,
                  images: Sequence[str | os.PathLike] = (), verify_batch: int = 4) -> Summary:
    """A vgg_flax checkpoint (orbax dir, or our .safetensors / a flax .msgpack with ``name``) ->
    a torch state_dict file (.pth or .safetensors) that torchvision's ``<name>()`` loads with
    ``strict=True`` (SSD: ``SSDFeatureExtractorVGG``'s keys without extra.1-4)."""
    start = time.perf_counter()
    check_verify_args(rtol, verify_batch, images, verify_outputs)
    src, out_path = Path(src), Path(out)
    if out_path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ConversionError(f"--out {out_path}: use a .pth, .pt or .safetensors file name")
    atomic.check_out(out_path, force)
    if name is not None:
        check_name(name)
    name, module, variables = formats.read_flax(src, name, overrides)
    mismatch = variables_mismatch(module, variables)
    if mismatch:  # never write tensors under another layer's name
        raise ConversionError(_misfit_message(src, name, variables, mismatch))
    src_bytes = atomic.path_size(src)
    num_params = _num_params(variables)
    lacks = (f"{src} lacks {{}} needed by {name}; was it written for another VGG variant?")
    try:
        in_channels = np.asarray(variables["params"]["conv1_1"]["kernel"]).shape[2]
    except (KeyError, TypeError) as err:  # no such leaf, or not a mapping where one belongs
        raise ConversionError(lacks.format(err)) from None
    nonfinite = {k: bad for k, a in formats.flatten(variables)
                 if (bad := int(np.size(a) - np.count_nonzero(np.isfinite(a))))}
    if nonfinite:  # before verification, which would only see NaN outputs
        raise nonfinite_error(str(src), nonfinite)
    x = V.verification_inputs(name, module, in_channels, images, verify_batch) \
        if verify_outputs else None
    # The Flax side first, on the arrays as read (moved to the device leaf by leaf, no second
    # copy), so the checkpoint is read once; the torch side later runs on the written file.
    flax_out = V.flax_outputs(module, variables, x, V.output_names(module)) \
        if verify_outputs else None
    # Convert leaf by leaf, dropping each Flax array once its torch copy exists.
    sd: OrderedDict[str, np.ndarray] = OrderedDict()
    try:
        for key, a in weights.iter_torch_arrays(variables, module, consume=True):
            if not key.endswith("num_batches_tracked") and \
                    a.dtype.name not in ("float32", "float16", "bfloat16", "float64"):
                raise ConversionError(f"{src}: {key} is {a.dtype}")
            sd[key] = a
            del a
    except KeyError as err:
        raise ConversionError(lacks.format(err)) from None
    del variables
    result = None
    with atomic.staged(out_path, functools.partial(_written_error, out_path)) as tmp:
        if out_path.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file(dict(sd), tmp)
        else:
            import torch
            torch.save(OrderedDict((k, torch_io.numpy_to_torch(v)) for k, v in sd.items()), tmp)
        del sd
        gc.collect()
        release_memory()
        if verify_outputs:
            result = V.verify(name, module, _torch_side(tmp), None, in_channels=in_channels,
                              rtol=rtol, x=x, flax_out=flax_out)
        atomic.settle(tmp, out_path, force, result)
    return Summary(name, num_params, str(src), src_bytes, out_path,
                   "safetensors" if out_path.suffix == ".safetensors" else "pth",
                   out_path.stat().st_size if out_path.exists() else 0,
                   time.perf_counter() - start, peak_rss_bytes(), result, [])
