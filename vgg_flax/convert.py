"""torch <-> Flax conversion: every weight layout we know, verified against torchvision, safe.

Python API (the CLIs in ``convert/`` and the ``vgg-torch-to-flax``/``vgg-flax-to-torch`` console
scripts only parse arguments and call these):

- ``load_torch_weights(name, weights) -> (module, variables)``: a torch weights file (or
  torchvision's published weights) as Flax variables, in memory.
- ``torch_to_flax(name, weights, out, ...) -> Summary``: the same, written (orbax, safetensors
  or flax msgpack) atomically and verified against torchvision's model.
- ``flax_to_torch(src, out, ...) -> Summary``: a vgg_flax checkpoint back to a torch state_dict
  that torchvision's module loads with ``strict=True``.
- ``decimate_fc(fc6_w, fc6_b, fc7_w, fc7_b)``: SSD's "reduced fc" from classifier weights.

Layouts read (into ``vgg_flax.from_torch``'s layout): torchvision's ``VGG`` state_dicts, with or
without DataParallel's ``module.`` prefix, bare or inside a checkpoint under ``state_dict`` or
``model``; for ``vgg16_ssd`` also torchvision's ``ssd300_vgg16`` (``backbone.`` keys, heads and
SSD's extra blocks dropped), its bare ``SSDFeatureExtractorVGG``, ssd.pytorch's
``vgg16_reducedfc.pth`` (a ``ModuleList``: keys ``0.weight`` ... ``33.bias``) and ssd.pytorch's full
SSD (``vgg.N``, ``L2Norm.weight``); timm's VGG layout (``pre_logits.fc1``/``fc2`` convolutions,
``head.fc``; see ``vgg_flax.timm_layout``) for any classifier. ``--weights hf:timm/vgg16.tv_in1k``
reads a file from the Hugging Face hub through huggingface_hub's cache.

Precision: weights are converted to float32 by default (fp16/bf16 sources are widened, which is
exact). ``dtype="keep"`` keeps the source's floating dtype, ``"float16"``/``"bfloat16"`` narrow.
The module's ``param_dtype`` follows, compute stays float32; BatchNorm statistics stay float32.
Verification then runs torchvision's model on the weights exactly as written (widened to fp32).

Memory: a ``.pth`` is memory-mapped and each tensor's pages are released once converted
(large tensors go in row blocks), the converted arrays are allocated so that jax uses them in
place, orbax writes them without its host copy and zstd buffers, and verification runs the Flax
model, frees it, then torchvision's model layer by layer from the mapped file. The converted
weights are held once; measured peaks are in the project README.

Verification: a fixed seeded batch (and ``images``) through torchvision's model and the Flax
model, one input at a time, float32, ``jax.default_matmul_precision("highest")``; it fails
when max |flax - torch| / max |torch| > ``rtol`` (1e-4). Top-5 agreement is reported, not
required (random weights have near-ties). safetensors/msgpack outputs are also read back and
compared bit for bit; orbax outputs by their metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import resource
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vgg_flax import arch, registry, timm_layout, torch_io
from vgg_flax.torch_io import Tensor, WeightFileError

FORMATS = ("orbax", "safetensors", "msgpack")
DTYPES = ("float32", "float16", "bfloat16", "keep")
SSD_NAME = "vgg16_ssd"
_CHUNK_BYTES = 32 << 20  # row blocks for large tensors: bounds the transient copy


class ConversionError(ValueError):
    """Bad input to a conversion (exit code 2); the message is one line with the fix."""


# -- small helpers ------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it in per-thread arenas otherwise,
    and orbax/tensorstore free large buffers from worker threads)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _path_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: jax on CPU can then use the memory as it is
    (``device_put(..., may_alias=True)``) instead of copying the model once more."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + n].view(dtype).reshape(shape)


def _array_tensor(a: np.ndarray) -> Tensor:
    """An in-memory ``Tensor`` (derived weights: decimated fc, initial values)."""
    def to_torch():
        import torch
        return torch.from_numpy(np.ascontiguousarray(a))
    return Tensor(a.shape, a.dtype, lambda sl: np.array(a[sl]), to_torch)


def _check_name(name: str) -> None:
    if name not in registry.list_models():
        raise ConversionError(f"unknown VGG {name!r}; choose one of: "
                              f"{', '.join(registry.list_models())}")


def build_module(name: str, num_classes: int | None = None,
                 overrides: Mapping[str, Any] | None = None):
    """``vgg_flax.create(name, ...)`` with CLI-level errors."""
    _check_name(name)
    fields = dict(overrides or {})
    if num_classes is not None:
        fields["num_classes"] = int(num_classes)
    try:
        return registry.create(name, **fields), fields
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{err}") from None


# -- torchvision's published weights ------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """Where weights came from: a file (``path``), maybe via torchvision's weights API (``enum``)."""
    path: Path
    enum: str | None = None   # e.g. "VGG16_Weights.IMAGENET1K_V1"

    @property
    def label(self) -> str:
        return f"{self.enum} ({self.path})" if self.enum else str(self.path)


def _weights_enum(name: str):
    """torchvision's Weights enum class for ``name`` (vgg16_ssd's backbone weights are vgg16's)."""
    tv = "vgg16" if name == SSD_NAME else arch.VARIANTS[name].torchvision
    if tv is None:
        return None
    from torchvision.models import get_model_weights
    return get_model_weights(tv)


def default_weights(name: str) -> str:
    """The torchvision weights ``torch_to_flax`` uses for ``name`` when none are given."""
    return "IMAGENET1K_FEATURES" if name == SSD_NAME else "IMAGENET1K_V1"


def hub_cache_file(weights) -> Path:
    """Where torchvision's weights API caches (and looks for) ``weights``' file."""
    import torch.hub
    from urllib.parse import urlparse
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def resolve_weights(name: str, weights: str | os.PathLike | None, progress: bool = True) -> Source:
    """A file for ``weights``: a path, or a torchvision enum member (``IMAGENET1K_V1``,
    ``VGG16_Weights.IMAGENET1K_FEATURES``, ``DEFAULT``) fetched by torchvision's weights API into
    torch's hub cache (progress bar, hash check). Offline with nothing cached: ConversionError."""
    if isinstance(weights, str) and weights.startswith("hf:"):
        return _hf_source(weights, progress)
    if weights is not None and (isinstance(weights, os.PathLike) or Path(weights).exists()
                                or not re.fullmatch(r"([A-Za-z0-9]+_Weights\.)?[A-Z0-9_]+",
                                                    str(weights))):
        return Source(Path(weights))
    enum_cls = _weights_enum(name)
    member = default_weights(name) if weights is None else str(weights).split(".")[-1]
    if enum_cls is None:
        raise ConversionError(f"{name} has no published torchvision weights; pass --weights PATH "
                              "(a .pth, .pt or .safetensors state_dict)")
    try:
        w = enum_cls[member] if member != "DEFAULT" else enum_cls.DEFAULT
    except KeyError:
        choices = ", ".join(m for m in enum_cls.__members__)
        raise ConversionError(f"{weights!r} is neither a file nor torchvision weights for {name} "
                              f"(choose {choices}, or pass a .pth/.safetensors path)") from None
    cached = hub_cache_file(w)
    label = f"{enum_cls.__name__}.{w.name}"
    if not cached.is_file():
        try:
            # torchvision's own API: progress bar, hub cache, hash check. It also unpickles the
            # file (weights_only); we drop that copy and memory-map the cached file instead.
            w.get_state_dict(progress=progress, check_hash=True, weights_only=True)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # offline: URLError, socket errors, HTTP errors ...
            raise ConversionError(
                f"cannot fetch torchvision's {label} ({torch_io._short(err)}) and it is not in "
                f"torch's hub cache at {cached}; download {w.url} there, or pass --weights PATH "
                "with a .pth/.safetensors file") from None
    return Source(cached, label)


def _hf_source(spec: str, progress: bool) -> Source:
    """``hf:OWNER/REPO[/FILE]`` (FILE defaults to model.safetensors) via huggingface_hub's cache."""
    from huggingface_hub.errors import EntryNotFoundError

    from vgg_flax.pretrained import hub_file
    parts = spec[3:].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ConversionError(f"--weights {spec!r}: write hf:OWNER/REPO or hf:OWNER/REPO/FILE, "
                              "e.g. hf:timm/vgg16.tv_in1k")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"
    try:
        return Source(hub_file(repo, filename, progress=progress), spec)
    except (OSError, EntryNotFoundError) as err:
        raise ConversionError(f"cannot get {filename} of Hugging Face repo {repo} "
                              f"({torch_io._short(err)}); check the name, or pass --weights PATH "
                              "with the downloaded file") from None


# -- layouts: any known torch layout -> vgg_flax.from_torch's layout ----------------------------
def detect_layout(keys: Iterable[str]) -> str:
    """One of: torchvision, ssd300 (torchvision detector), ssd_extractor (its backbone),
    ssd_pytorch_base (``vgg16_reducedfc.pth``), ssd_pytorch (full ssd.pytorch SSD), unknown."""
    keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    if any(k.startswith("backbone.") for k in keys):
        return "ssd300"
    if any(k.startswith("vgg.") for k in keys) and any(k.startswith("L2Norm") for k in keys):
        return "ssd_pytorch"
    if keys and all(k.split(".")[0].isdigit() for k in keys):
        return "ssd_pytorch_base"
    if "scale_weight" in keys or any(k.startswith("extra.") for k in keys):
        return "ssd_extractor"
    if any(k.startswith(("features.", "classifier.")) for k in keys):
        return "torchvision"
    return "unknown"


def _strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    while tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return dict(tensors)


def _reshaped(src: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``src`` seen with another shape of the same rows (timm's classifier convolutions)."""
    tail = shape[1:]
    return Tensor(shape, src.dtype, lambda sl: src.rows(sl).reshape((-1,) + tail),
                  lambda: src.torch().reshape(shape), src.release, src.mmapped)


def decimate_fc(fc6_w: np.ndarray, fc6_b: np.ndarray, fc7_w: np.ndarray, fc7_b: np.ndarray,
                in_channels: int = 512, grid: int = 7):
    """SSD/DeepLab's "reduced fc": classifier fc6/fc7 -> atrous conv6/conv7 (torch layouts).

    fc6 (4096, 512*7*7) is viewed as (4096, 512, 7, 7) and keeps every 4th output channel and
    every 3rd spatial position -> conv6 (1024, 512, 3, 3); fc7 (4096, 4096) keeps every 4th row
    and column -> conv7 (1024, 1024, 1, 1); biases keep every 4th entry.
    """
    return _decimate(fc6_w[::4], fc6_b, fc7_w, fc7_b, in_channels, grid)


def _decimate(fc6_rows: np.ndarray, fc6_b, fc7_w, fc7_b, in_channels: int = 512, grid: int = 7):
    """``decimate_fc`` given only fc6's rows 0, 4, 8 ... (all that it keeps)."""
    conv6 = fc6_rows.reshape(fc6_rows.shape[0], in_channels, grid, grid)[:, :, ::3, ::3]
    conv7 = fc7_w[::4, ::4]
    return (np.ascontiguousarray(conv6), np.ascontiguousarray(fc6_b[::4]),
            np.ascontiguousarray(conv7.reshape(conv7.shape + (1, 1))),
            np.ascontiguousarray(fc7_b[::4]))


def _ssd_from_classifier_features(t: dict[str, Tensor], pool4: int, tail: int) -> dict[str, Tensor]:
    """torchvision vgg16's ``features.N`` -> SSDFeatureExtractorVGG's keys (features/extra.0)."""
    out = {}
    for k, v in t.items():
        if not k.startswith("features."):
            continue
        i, leaf = k.split(".")[1:]
        i = int(i)
        if i < pool4:
            out[k] = v
        elif i < tail:
            out[f"extra.0.{i - pool4}.{leaf}"] = v
    return out


def to_library_layout(tensors: Mapping[str, Tensor], name: str, module, *,
                      ssd_from_classifier: bool = False, ssd_features_only: bool = False,
                      seed: int = 0) -> tuple[dict[str, Tensor], list[str]]:
    """Rename any known layout to the keys ``vgg_flax.from_torch`` expects for ``name``.

    Returns (tensors, notes): notes say what was dropped or derived, for the user to read.
    """
    notes: list[str] = []
    t = {k: v for k, v in _strip_prefix(tensors, "module.").items()
         if not k.endswith("num_batches_tracked")}
    if timm_layout.is_timm_layout(t):  # timm's convolutional classifier: reshapes, no copies
        t = timm_layout.to_torchvision(t, _reshaped)
    layout = detect_layout(t)
    is_ssd = module.head == "ssd"
    if not is_ssd:
        if layout not in ("torchvision", "unknown"):
            raise ConversionError(f"these are SSD backbone weights ({layout} layout), not a "
                                  f"{name} classifier; convert them as {SSD_NAME}")
        if ssd_from_classifier or ssd_features_only:
            raise ConversionError(f"--ssd-from-classifier/--ssd-features-only build {SSD_NAME}; "
                                  f"convert as {SSD_NAME}, not {name}")
        if not module.include_top:
            dropped = [k for k in t if k.startswith("classifier.")]
            for k in dropped:
                del t[k]
            if dropped:
                notes.append(f"include_top=False: dropped the {len(dropped)} classifier tensors")
        return t, notes

    # SSD backbone (torchvision's SSDFeatureExtractorVGG keys).
    feats = arch.features_layers(module.cfg, module.batch_norm, module.width)
    pool4 = next(layer.torch_index for layer in feats if layer.name == "pool4")
    tail = feats[-1].torch_index + 1          # where ssd.pytorch's pool5 sits (30 for D)
    if layout == "ssd300":
        kept = {k[len("backbone."):]: v for k, v in t.items() if k.startswith("backbone.")}
        dropped = len(t) - len(kept)
        t = kept
        if dropped:
            notes.append(f"dropped {dropped} tensors of SSD300's detection heads (not VGG)")
        layout = "ssd_extractor"
    if layout == "ssd_pytorch":
        kept = {k[len("vgg."):]: v for k, v in t.items() if k.startswith("vgg.")}
        extra = len(t) - len(kept) - ("L2Norm.weight" in t)
        if "L2Norm.weight" in t:
            kept["scale_weight"] = t["L2Norm.weight"]
        t = kept
        notes.append(f"dropped {extra} tensors of ssd.pytorch's extras/loc/conf layers (not VGG)")
        layout = "ssd_pytorch_base"
    if layout == "ssd_pytorch_base":
        renamed = {}
        for k, v in t.items():
            if k == "scale_weight":
                renamed[k] = v
                continue
            i, leaf = k.split(".", 1)
            i = int(i)
            new = (f"features.{i}" if i < pool4 else f"extra.0.{i - pool4}" if i < tail
                   else f"extra.0.{tail - pool4}.{i - tail}")
            renamed[f"{new}.{leaf}"] = v
        t = renamed
        if "scale_weight" not in t and module.l2norm:
            t["scale_weight"] = _array_tensor(np.full((arch.scale(512, module.width),), 20.0, np.float32))
            notes.append("ssd.pytorch keeps conv4_3's L2Norm scale outside the VGG base: set to "
                         "its initial value 20")
    elif layout == "ssd_extractor":
        extras = [k for k in t if k.startswith("extra.") and k.split(".")[1] != "0"]
        for k in extras:
            del t[k]
        if extras:
            notes.append(f"dropped {len(extras)} tensors of SSD's extra blocks extra.1-4 "
                         "(SSD's own layers after conv7, not VGG)")
    elif layout == "torchvision":
        if not (ssd_from_classifier or ssd_features_only):
            raise ConversionError(
                f"these are classification weights (torchvision layout), not an SSD backbone: pass "
                f"--ssd-from-classifier to build conv6/conv7 from fc6/fc7 as SSD did, or "
                f"--ssd-features-only to keep the convolutions and initialise conv6/conv7 as "
                f"torchvision's ssd300_vgg16 does")
        t = _ssd_layout_from_classifier(t, module, pool4, tail, ssd_from_classifier, seed, notes)
    return t, notes


def _ssd_layout_from_classifier(t, module, pool4, tail, decimate, seed, notes):
    head = f"extra.0.{tail - pool4}"
    out = _ssd_from_classifier_features(t, pool4, tail)
    if decimate:
        need = ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]
        missing = [k for k in need if k not in t]
        shapes_ok = (not missing and t["classifier.0.weight"].shape == (4096, 512 * 49)
                     and t["classifier.3.weight"].shape == (4096, 4096))
        if missing or not shapes_ok or module.width != 1 or module.hidden_size != 1024:
            raise ConversionError("--ssd-from-classifier needs torchvision vgg16 classifier "
                                  "weights (fc6 4096x25088, fc7 4096x4096)")
        fc6 = t["classifier.0.weight"]
        # Only every 4th row of fc6 is needed: read those, not the 400 MB matrix.
        w6 = fc6.rows(slice(None, None, 4))
        fc6.release()
        parts = _decimate(w6, t["classifier.0.bias"].numpy(), t["classifier.3.weight"].numpy(),
                          t["classifier.3.bias"].numpy())
        t["classifier.3.weight"].release()
        if not all(np.isfinite(p).all() for p in parts):
            raise ConversionError("the classifier weights hold NaN/inf (torchvision's "
                                  "IMAGENET1K_FEATURES has no classifier): use IMAGENET1K_V1 "
                                  "with --ssd-from-classifier, or --ssd-features-only")
        for leaf, a in zip(("1.weight", "1.bias", "3.weight", "3.bias"), parts):
            out[f"{head}.{leaf}"] = _array_tensor(a)
        notes.append("conv6/conv7 decimated from fc6/fc7 (SSD's reduced fc: every 4th channel, "
                     "every 3rd position of fc6's 7x7)")
    else:
        import torch
        gen = torch.Generator().manual_seed(seed)
        hidden = arch.scale(module.hidden_size, module.width)
        c5 = arch.scale(512, module.width)
        for idx, shape in ((1, (hidden, c5, 3, 3)), (3, (hidden, hidden, 1, 1))):
            w = torch.empty(shape)
            # torch.nn.init.xavier_uniform_ with an explicit generator (same distribution as
            # torchvision's ssd._xavier_init, reproducible from --seed).
            fan_in, fan_out = shape[1] * shape[2] * shape[3], shape[0] * shape[2] * shape[3]
            bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
            w.uniform_(-bound, bound, generator=gen)
            out[f"{head}.{idx}.weight"] = _array_tensor(w.numpy())
            out[f"{head}.{idx}.bias"] = _array_tensor(np.zeros(hidden, np.float32))
        notes.append(f"the weights hold no conv6/conv7: initialised as torchvision's ssd300_vgg16 "
                     f"does (Xavier uniform, zero bias; seed {seed}); train them before use")
    if module.l2norm:
        out["scale_weight"] = _array_tensor(np.full((arch.scale(512, module.width),), 20.0, np.float32))
        notes.append("conv4_3's L2Norm scale set to SSD's initial value 20")
    return out


# -- shape checks with a suggestion --------------------------------------------------------------
class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)


def _expected(module, tensors) -> dict[str, tuple[int, ...]]:
    from vgg_flax import weights
    shapes = {k: _Shape(v.shape) for k, v in tensors.items()}
    return weights.expected_torch_shapes(module, weights.in_channels_of(shapes, module))


def suggest_overrides(tensors: Mapping[str, Tensor], name: str) -> dict[str, Any] | None:
    """The VGG fields (num_classes, hidden_size, pool_size, width) that make ``tensors`` fit
    ``name``, read from their shapes; None when no such fields exist."""
    try:
        module = registry.create(name)
        first = next(k for k in ("features.0.weight",) if k in tensors)
        fields: dict[str, Any] = {}
        width = tensors[first].shape[0] / 64
        if width != 1:
            fields["width"] = width
        if module.head == "fc" and "classifier.0.weight" in tensors:
            convs = [k for k in tensors if k.startswith("features.") and len(tensors[k].shape) == 4]
            last = max(convs, key=lambda k: int(k.split(".")[1]))
            c_last = tensors[last].shape[0]
            hidden, fan_in = tensors["classifier.0.weight"].shape
            area = fan_in // c_last
            side = int(round(area ** 0.5))
            if side * side * c_last != fan_in:
                return None
            if hidden != 4096:
                fields["hidden_size"] = hidden
            if side != 7:
                fields["pool_size"] = (side, side)
            if "classifier.6.weight" in tensors and tensors["classifier.6.weight"].shape[0] != 1000:
                fields["num_classes"] = tensors["classifier.6.weight"].shape[0]
        if not fields:
            return None
        candidate = registry.create(name, **fields)
        expected = _expected(candidate, tensors)
        if set(expected) == set(tensors) and all(tensors[k].shape == s for k, s in expected.items()):
            return fields
    except (StopIteration, KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
    return None


def _flags(fields: Mapping[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        if k == "num_classes":
            parts.insert(0, f"--num-classes {v}")
        else:
            v = ",".join(map(str, v)) if isinstance(v, tuple) else v
            parts.append(f"--set {k}={v}")
    return " ".join(parts)


def check_fit(tensors: Mapping[str, Tensor], name: str, module, given: Mapping[str, Any]) -> None:
    """Raise ConversionError (one line, with the fix) unless ``tensors`` fit ``module`` exactly."""
    from vgg_flax import weights
    expected = _expected(module, tensors)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k}: got {tensors[k].shape}, expected {s}" for k, s in expected.items()
             if k in tensors and tensors[k].shape != s]
    if not (missing or unexpected or wrong):
        return
    suggestion = suggest_overrides(tensors, name)
    if suggestion and suggestion != {k: given.get(k) for k in suggestion}:
        what = ", ".join(f"{k}={v}" for k, v in suggestion.items())
        raise ConversionError(f"these {name} weights have other shapes ({what}, read from the "
                              f"weights): pass {_flags(suggestion)}")
    msg = weights.mismatch_message(name, {k: _Shape(v.shape) for k, v in tensors.items()},
                                    module, missing, unexpected, wrong)
    raise ConversionError(msg.replace("pass num_classes=", "pass --num-classes "))


# -- torch layout -> Flax variables, block by block ----------------------------------------------
def _out_dtype(dtype: str, tensors: Mapping[str, Tensor]) -> np.dtype:
    if dtype == "keep":
        floats = {v.dtype for v in tensors.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"}
        if len(floats) > 1:
            raise ConversionError(f"--dtype keep: the weights mix {sorted(d.name for d in floats)}; "
                                  "pick one with --dtype float32|float16|bfloat16")
        return floats.pop() if floats else np.dtype(np.float32)
    return torch_io._np_dtype(dtype)


def map_to_flax(tensors: Mapping[str, Tensor], module, dtype: np.dtype,
                progress: bool = True) -> dict[str, Any]:
    """Flax variables (numpy) for ``module`` from library-layout tensors, converting each tensor in
    row blocks and releasing its file pages, so the source is never resident next to the copy.
    Params take ``dtype``; BatchNorm statistics stay float32."""
    from tqdm.auto import tqdm

    from vgg_flax import weights
    entries = weights.torch_entries(module)
    variables: dict[str, Any] = {}
    total = sum(tensors[e.torch_key].nbytes for e in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting",
              disable=None if progress else True,  # None: only on a terminal
              leave=False) as bar:
        for e in entries:
            src = tensors[e.torch_key]
            want = dtype if e.collection == "params" else np.dtype(np.float32)
            rows = src.shape[0] if src.shape else 1
            row_bytes = max(src.nbytes // max(rows, 1), 1)
            step = max(1, _CHUNK_BYTES // row_bytes)
            first = weights.torch_to_flax_array(e, np.zeros((1,) + src.shape[1:], src.dtype), module)
            out = empty_aligned(first.shape[:-1] + (rows,), want)
            for r0 in range(0, rows, step):
                block = weights.torch_to_flax_array(e, src.rows(slice(r0, r0 + step)), module)
                out[..., r0:r0 + step] = block.astype(want, copy=False)
                bar.update(block.nbytes)
            src.release()
            variables.setdefault(e.collection, {}).setdefault(e.path[0], {})[e.path[1]] = out
    return variables


# -- loading (Python API) -----------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    name: str
    module: Any
    fields: dict[str, Any]            # VGG field overrides (num_classes, width ...)
    source: Source
    file: torch_io.WeightFile
    tensors: dict[str, Tensor]        # library layout, lazily read
    dtype: np.dtype
    notes: list[str]


def prepare(name: str, weights: str | os.PathLike | None = None, *, num_classes: int | None = None,
            overrides: Mapping[str, Any] | None = None, dtype: str = "float32",
            ssd_from_classifier: bool = False, ssd_features_only: bool = False, seed: int = 0,
            progress: bool = True) -> Prepared:
    """Open and check everything before any output is written (all errors: ConversionError)."""
    module, fields = build_module(name, num_classes, overrides)
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = resolve_weights(name, weights, progress)
    if source.enum and source.enum.endswith("IMAGENET1K_FEATURES"):
        if name != SSD_NAME:
            raise ConversionError(f"{source.enum} holds no valid classifier (torchvision: "
                                  f"features only); convert it as {SSD_NAME}, or use IMAGENET1K_V1")
        if not ssd_from_classifier:
            ssd_features_only = True
    try:
        wf = torch_io.open_weights(source.path)
    except WeightFileError as err:
        raise ConversionError(str(err)) from None
    tensors, notes = to_library_layout(wf, name, module, ssd_from_classifier=ssd_from_classifier,
                                       ssd_features_only=ssd_features_only, seed=seed)
    bad = sorted({k for k, v in tensors.items() if v.dtype.kind not in "f" and v.dtype.name != "bfloat16"})
    if bad:
        raise ConversionError(f"tensors {', '.join(bad[:4])} are not floating point "
                              f"({tensors[bad[0]].dtype}); these are not VGG weights")
    check_fit(tensors, name, module, fields)
    out_dtype = _out_dtype(dtype, tensors)
    src_dtypes = sorted({v.dtype.name for v in tensors.values()})
    if out_dtype.name != "float32" or src_dtypes != ["float32"]:
        notes.append(f"weights {'/'.join(src_dtypes)} -> {out_dtype.name} (BatchNorm statistics float32)")
    if out_dtype != np.float32:
        fields["param_dtype"] = out_dtype.name
        module = module.clone(param_dtype=_jnp_dtype(out_dtype))
    return Prepared(name, module, fields, source, wf, tensors, out_dtype, notes)


def _jnp_dtype(d: np.dtype):
    import jax.numpy as jnp
    return jnp.dtype(d.name)


def load_torch_weights(name: str, weights: str | os.PathLike | None = None, **kwargs):
    """(module, variables) for VGG ``name`` from a torch weights file or torchvision's weights.

    ``kwargs``: num_classes, overrides (VGG fields), dtype, ssd_from_classifier,
    ssd_features_only, seed, progress. Raises ConversionError for any bad input.
    """
    p = prepare(name, weights, **kwargs)
    return p.module, map_to_flax(p.tensors, p.module, p.dtype, kwargs.get("progress", True))


# -- writing, atomically -------------------------------------------------------------------------
def _flatten(variables: Mapping[str, Any], prefix: str = "") -> list[tuple[str, np.ndarray]]:
    out = []
    for k, v in variables.items():
        if isinstance(v, Mapping):
            out += _flatten(v, f"{prefix}{k}/")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


_ST_NAMES = {v: k for k, v in torch_io._ST_DTYPES.items()}


def write_safetensors(path: Path, arrays: Sequence[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A .safetensors file written array by array (no second copy of the whole model)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, a in arrays:
        n = a.size * a.dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[a.dtype.name], "shape": list(a.shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))


def write_msgpack(path: Path, variables: Mapping[str, Any]) -> None:
    """Flax's msgpack (``flax.serialization.to_bytes``/``msgpack_restore`` format), streamed:
    nested maps of ndarrays as ext type 1 holding (shape, dtype name, raw bytes)."""
    import msgpack
    packer = msgpack.Packer(use_bin_type=True)
    with open(path, "wb") as f:
        def emit(node):
            f.write(packer.pack_map_header(len(node)))
            for k, v in node.items():
                f.write(packer.pack(str(k)))
                if isinstance(v, Mapping):
                    emit(v)
                    continue
                a = np.ascontiguousarray(v)
                raw = a.size * a.dtype.itemsize
                head = (b"\x93" + packer.pack(list(a.shape)) + packer.pack(a.dtype.name)
                        + b"\xc6" + struct.pack(">I", raw))
                f.write(b"\xc9" + struct.pack(">I", len(head) + raw) + b"\x01")  # ext32, type 1
                f.write(head)
                f.write(memoryview(a).cast("B"))
        emit(variables)


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C inside the block is held until the block ends, then raised as KeyboardInterrupt.

    orbax writes from background threads that outlive a KeyboardInterrupt in the main thread;
    letting the write finish first means the temporary output can then be removed for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _tmp_sibling(out: Path, tag: str) -> Path:
    # Hidden, unique, and with out's suffix so that readers pick the same format.
    return out.parent / f".{out.stem}.{tag}-{uuid.uuid4().hex[:8]}{out.suffix}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def commit(tmp: Path, out: Path, force: bool) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is replaced only with ``force``, and is put
    back if the move fails."""
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out} exists; pass --force to overwrite it")
        old = _tmp_sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)
    else:
        os.rename(tmp, out)


def settle(tmp: Path, out: Path, force: bool, result: Any) -> None:
    """Commit the temporary output to ``out``, unless its verification failed: then delete it."""
    if result is not None and not result.ok:
        _remove(tmp)
    else:
        commit(tmp, out, force)


def format_for(out: Path | None, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if out is not None and out.suffix == ".safetensors":
        return "safetensors"
    if out is not None and out.suffix in (".msgpack", ".flax"):
        return "msgpack"
    return "orbax"


def default_out(name: str, fmt: str) -> Path:
    return Path("out") / (name + {"orbax": "", "safetensors": ".safetensors",
                                  "msgpack": ".msgpack"}[fmt])


def write_flax(path: Path, variables: Mapping[str, Any], name: str, module, fields, fmt: str,
               extra: Mapping[str, Any] | None = None) -> None:
    """Write ``variables`` at ``path`` (which must not exist) in ``fmt``."""
    from vgg_flax import checkpoint
    if fmt == "orbax":
        checkpoint.write(path, variables, name, module=module, extra=extra)
    elif fmt == "safetensors":
        meta = {"format": checkpoint.FORMAT, "name": name,
                "overrides": json.dumps(checkpoint.module_overrides(module, name))}
        write_safetensors(path, _flatten(variables), meta)
    else:
        write_msgpack(path, variables)


def read_flax(path: Path, name: str | None = None, overrides: Mapping[str, Any] | None = None):
    """(name, module, variables) from an orbax dir, our .safetensors, or a flax .msgpack (which
    carries no name: pass ``name`` and shape ``overrides``)."""
    from vgg_flax import checkpoint
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"no such checkpoint: {path}; pass a directory written by "
                              "convert/torch_to_flax.py or vgg_flax.save")
    if path.is_dir():
        try:
            info = checkpoint.read_info(path)
        except FileNotFoundError as err:
            raise ConversionError(str(err)) from None
        module, variables = checkpoint.load(path)
        return info["name"], module, variables
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty; re-create it with convert/torch_to_flax.py")
    if path.suffix == ".safetensors":
        try:
            header, meta, _ = torch_io.read_safetensors_header(path)
        except WeightFileError as err:
            raise ConversionError(str(err)) from None
        if "name" not in meta:
            raise ConversionError(f"{path} has no vgg_flax metadata (name); write it with "
                                  "convert/torch_to_flax.py --format safetensors")
        fields = checkpoint._from_json(json.loads(meta.get("overrides", "{}")))
        module = registry.create(meta["name"], **fields)
        tensors = torch_io._safetensors_tensors(path)
        flat = {}
        for k in list(tensors):
            flat[k] = tensors.pop(k).numpy()
        return meta["name"], module, _unflatten(flat)
    from flax import serialization
    if name is None:
        raise ConversionError(f"{path} (flax msgpack) does not say which VGG it holds; pass --name")
    module, _ = build_module(name, None, overrides)
    try:
        variables = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated types for corrupt input
        raise ConversionError(f"{path} is not a readable flax msgpack file ({torch_io._short(err)})") from None
    return name, module, variables


# -- verification against torchvision -----------------------------------------------------------
@dataclasses.dataclass
class Verification:
    inputs: int
    size: int
    max_abs: float
    max_rel: float                    # max |flax - torch| / max |torch|
    top5_agree: int | None            # inputs whose ordered top-5 classes agree (classifiers)
    rtol: float
    outputs: tuple[str, ...]          # compared outputs (logits, or SSD's feature maps)
    readback: bool = False            # the written file was read back bit-identical

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.rtol

    def line(self) -> str:
        top5 = (f", top-5 agree {self.top5_agree}/{self.inputs}"
                if self.top5_agree is not None else "")
        what = "logits" if self.outputs == ("logits",) else "/".join(self.outputs)
        return (f"verify: {self.inputs} inputs {self.size}x{self.size}, {what} max |diff| "
                f"{self.max_abs:.2e}, max rel {self.max_rel:.2e} (tolerance {self.rtol:g})"
                f"{top5}{'; file read back bit-identical' if self.readback else ''}: "
                f"{'OK' if self.ok else 'FAILED'}")


def torch_reference(name: str, module, in_channels: int = 3):
    """The torch module to compare against, built from torchvision itself: torchvision's
    ``vgg*`` builder when the shapes are its own, else torchvision's ``VGG`` class with a
    features stack made of torch layers from the same cfg; for the SSD backbone, torchvision's
    ``SSDFeatureExtractorVGG`` around torchvision's vgg16. Parameters on the meta device
    (nothing allocated): load weights with ``load_state_dict(..., assign=True)``."""
    import torch
    import torchvision
    from torch import nn
    from torchvision.models import vgg as tvgg
    if module.head == "ssd":
        if (module.width, module.hidden_size, in_channels, tuple(module.cfg)) != \
                (1.0, 1024, 3, arch.CFGS["D-SSD"]):
            raise ConversionError("verification supports the standard SSD300 backbone only; "
                                  "pass --no-verify")
        from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
        torch.manual_seed(0)  # SSD's extra blocks 1-4 are not VGG: random, and not compared
        return SSDFeatureExtractorVGG(torchvision.models.vgg16().features, highres=False).eval()
    variant = arch.VARIANTS[name]
    base = registry.create(name)
    std = {f: getattr(base, f) for f in ("cfg", "batch_norm", "width", "hidden_size", "pool_size",
                                          "include_top", "bn_epsilon", "lrn_size", "lrn_alpha",
                                          "lrn_beta", "lrn_k")}
    same = all(getattr(module, f) == v for f, v in std.items())
    with torch.device("meta"):
        if variant.torchvision and same and in_channels == 3:
            return torchvision.models.get_model(variant.torchvision, weights=None,
                                                num_classes=module.num_classes).eval()
        layers, c = [], in_channels
        for layer in arch.features_layers(module.cfg, module.batch_norm, module.width):
            if layer.kind == "conv":
                layers.append(nn.Conv2d(c, layer.features, layer.kernel, padding=layer.padding,
                                        dilation=layer.dilation))
                c = layer.features
            elif layer.kind == "bn":
                layers.append(nn.BatchNorm2d(c, eps=module.bn_epsilon))
            elif layer.kind == "relu":
                layers.append(nn.ReLU(inplace=True))
            elif layer.kind == "lrn":
                layers.append(nn.LocalResponseNorm(module.lrn_size, module.lrn_alpha,
                                                   module.lrn_beta, module.lrn_k))
            else:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=layer.pool == "ceil"))
        model = tvgg.VGG(nn.Sequential(*layers), num_classes=module.num_classes, init_weights=False)
        if not module.include_top:
            model.avgpool, model.classifier = nn.Identity(), nn.Identity()
        elif tuple(module.pool_size) != (7, 7) or module.hidden_size != 4096:
            h = module.hidden_size
            model.avgpool = nn.AdaptiveAvgPool2d(tuple(module.pool_size))
            model.classifier = nn.Sequential(
                nn.Linear(c * module.pool_size[0] * module.pool_size[1], h), nn.ReLU(True),
                nn.Dropout(), nn.Linear(h, h), nn.ReLU(True), nn.Dropout(),
                nn.Linear(h, module.num_classes))
    return model.eval()


def verification_inputs(name: str, module, in_channels: int, images: Sequence[str | os.PathLike] = (),
                        batch: int = 4, seed: int = 0) -> np.ndarray:
    """(N, H, W, C) float32: ``batch`` seeded normal images, then ``images`` preprocessed as the
    weights expect (resize + centre crop + mean/std; SSD: 300x300)."""
    meta = registry.metadata(name)
    size = meta["input_size"][0]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch, size, size, in_channels), np.float32)]
    if images:
        from PIL import Image, UnidentifiedImageError
        pre = meta["preprocessing"]
        mean = np.asarray(pre["mean"], np.float32)
        std = np.asarray(pre["std"], np.float32)
        for f in images:
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB" if in_channels == 3 else "L")
                    if name == SSD_NAME:  # SSD resizes to a fixed 300x300
                        im = im.resize((size, size), Image.BILINEAR)
                    else:
                        s = pre["resize_size"] / min(im.size)
                        im = im.resize((max(size, round(im.size[0] * s)),
                                        max(size, round(im.size[1] * s))), Image.BILINEAR)
                        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                        im = im.crop((left, top, left + size, top + size))
                    a = np.asarray(im, np.float32).reshape(size, size, in_channels) / 255.0
            except (OSError, UnidentifiedImageError) as err:
                raise ConversionError(f"cannot read image {f} ({torch_io._short(err)}); pass a "
                                      "JPEG/PNG file") from None
            if in_channels == 3:
                a = (a - mean) / std
            xs.append(a[None])
    return np.concatenate(xs)


def _torch_outputs(name, module, tensors: Mapping[str, Any], x: np.ndarray, in_channels: int,
                   file_backed: Iterable[str] = ()):
    """torchvision's model on ``x``; ``file_backed`` names the tensors that are memory-mapped
    from the weights file, whose pages are handed back once used."""
    import torch
    mapped = {tensors[k].data_ptr() for k in file_backed}
    model = torch_reference(name, module, in_channels)
    sd = OrderedDict((k, v) for k, v in tensors.items())
    result = model.load_state_dict(sd, strict=module.head != "ssd", assign=True)
    if module.head == "ssd":
        bad = [k for k in result.missing_keys if not k.startswith(("extra.1", "extra.2", "extra.3",
                                                                   "extra.4"))]
        if bad or result.unexpected_keys:
            raise ConversionError(f"internal: SSD reference did not take keys {bad or result.unexpected_keys}")
    def drop_pages(layer, inputs, output):
        # Weights are memory-mapped from the file: once a layer has run, hand its pages back,
        # so the whole model is never resident at once (they are re-read for the next input).
        for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
            if t.data_ptr() in mapped and t.is_contiguous():
                torch_io._madvise_dontneed(t.data_ptr(), t.numel() * t.element_size())

    hooks = [m.register_forward_hook(drop_pages) for m in model.modules()
             if next(m.parameters(recurse=False), None) is not None]
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():  # one input at a time: activations of one image, not a batch
        ys = [model(xt[i:i + 1]) for i in range(xt.shape[0])]
    for h in hooks:
        h.remove()
    y = ({k: torch.cat([d[k] for d in ys]) for k in ys[0]} if isinstance(ys[0], dict)
         else torch.cat(ys))
    del model, sd, ys
    if module.head == "ssd":
        # SSDFeatureExtractorVGG's "0" is the L2Norm-scaled relu4_3, "1" is relu7.
        return {"conv4_3_norm": y["0"].numpy().transpose(0, 2, 3, 1),
                "relu7": y["1"].numpy().transpose(0, 2, 3, 1)}
    if not module.include_top:  # torchvision flattens pool5 in (C, H, W) order
        return {"pool5": y.numpy()}
    return {"logits": y.numpy()}


def _flax_outputs(module, variables, x: np.ndarray, outputs: Sequence[str]):
    """The Flax model on ``x``, one input at a time (activations of one image, not a batch).

    Leaves go to the device one by one; 64-byte-aligned host arrays (``map_to_flax``'s) are
    used in place, others are copied and the host copy dropped.
    """
    import jax
    import jax.numpy as jnp
    flat = _flatten(variables)
    device: dict[str, Any] = {}
    for k, _ in flat:
        node = variables
        *parents, leaf = k.split("/")
        for p in parents:
            node = node[p]
        a = node[leaf]
        aligned = isinstance(a, np.ndarray) and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
        device[k] = jax.device_put(a, may_alias=True) if aligned else jnp.asarray(a)
        if not aligned and isinstance(node, dict):
            node[leaf] = None
        del a
    del flat
    tree = _unflatten(device)
    del device
    m = module.clone(taps=tuple(outputs)) if module.head == "ssd" else module
    fn = jax.jit(m.apply)
    ys = []
    with jax.default_matmul_precision("highest"):
        for i in range(x.shape[0]):
            y = fn(tree, jnp.asarray(x[i:i + 1]))
            ys.append({k: np.asarray(v) for k, v in y.items()} if isinstance(y, dict)
                      else {"_": np.asarray(y)})
    del tree
    y = {k: np.concatenate([d[k] for d in ys]) for k in ys[0]}
    if "_" not in y:
        return y
    if not module.include_top:
        return {"pool5": y["_"].transpose(0, 3, 1, 2).reshape(x.shape[0], -1)}
    return {"logits": y["_"]}


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], rtol: float,
            size: int) -> Verification:
    max_abs, max_rel = 0.0, 0.0
    for k, r in ref.items():
        g = got[k].astype(np.float64)
        r = r.astype(np.float64)
        d = np.abs(g - r)
        a = float(d.max()) if np.isfinite(d).all() else float("nan")
        scale = float(np.abs(r).max())
        max_abs = max(max_abs, a) if np.isfinite(a) else float("nan")
        rel = a / scale if scale > 0 else (0.0 if a == 0 else float("inf"))
        max_rel = max(max_rel, rel) if np.isfinite(rel) else float("nan")
    top5 = None
    if "logits" in ref and ref["logits"].shape[-1] >= 5:
        rt = np.argsort(-ref["logits"], axis=-1)[:, :5]
        gt = np.argsort(-got["logits"], axis=-1)[:, :5]
        top5 = int((rt == gt).all(axis=1).sum())
    n = next(iter(ref.values())).shape[0]
    return Verification(n, size, max_abs, max_rel, top5, rtol, tuple(ref))


def verify(name: str, module, torch_tensors: Callable[[], Mapping[str, Any]],
           flax_variables: Callable[[], Any] | None, *, in_channels: int = 3,
           images: Sequence[str | os.PathLike] = (), rtol: float = 1e-4,
           batch: int = 4, x: np.ndarray | None = None,
           flax_out: Mapping[str, np.ndarray] | None = None) -> Verification:
    """torchvision's model on ``torch_tensors()`` vs the Flax ``module`` on ``flax_variables()``
    (or its outputs ``flax_out``, computed earlier), one after the other, never both models in
    memory, on the same inputs ``x`` (default: ``verification_inputs``)."""
    if x is None:
        x = verification_inputs(name, module, in_channels, images, batch)
    tensors = torch_tensors()
    file_backed = getattr(tensors, "file_backed", ())
    ref = _torch_outputs(name, module, tensors, x, in_channels, file_backed)
    del tensors
    gc.collect()  # the torch model is gone before the Flax side loads
    release_memory()
    got = flax_out if flax_out is not None else _flax_outputs(module, flax_variables(), x, tuple(ref))
    return compare(ref, got, rtol, x.shape[1])


def output_names(module) -> tuple[str, ...]:
    """What verification compares: logits, pool5 (no classifier) or SSD's two feature maps."""
    if module.head == "ssd":
        return ("conv4_3_norm", "relu7")
    return ("logits",) if module.include_top else ("pool5",)


def digests(variables: Mapping[str, Any]) -> dict[str, str]:
    """blake2b of every leaf's bytes (and dtype, shape): to check a written file bit for bit."""
    import hashlib
    out = {}
    for k, a in _flatten(variables):
        a = np.ascontiguousarray(np.asarray(a))
        h = hashlib.blake2b(f"{a.dtype.name}{a.shape}".encode(), digest_size=16)
        h.update(memoryview(a).cast("B"))
        out[k] = h.hexdigest()
    return out


def _reference_tensors(prep: Prepared) -> dict[str, Any]:
    """The library-layout tensors as torch tensors, rounded to the output dtype and widened to
    float32 (torch's reference runs in fp32); mmapped, so no copy for float32 files."""
    import torch
    out = _TorchWeights()
    for k, v in prep.tensors.items():
        t = v.torch()
        if prep.dtype.name != "float32":
            t = t.to(getattr(torch, prep.dtype.name))
        out[k] = t.float() if t.dtype != torch.float32 else t
        if v.mmapped and out[k] is t and v.torch() is t:
            out.file_backed.append(k)
    return out


class _TorchWeights(dict):
    """name -> torch tensor, and which of them are views of the memory-mapped file."""

    def __init__(self):
        super().__init__()
        self.file_backed: list[str] = []


def _shapes(variables) -> dict[str, str]:
    return {k: f"{np.dtype(a.dtype).name}{tuple(a.shape)}" for k, a in _flatten(variables)}


def check_written(path: Path, fmt: str, name: str, fields: Mapping[str, Any],
                  expected: Mapping[str, str]) -> None:
    """The written file holds what was converted: safetensors/msgpack are read back and compared
    bit for bit (``digests``); for orbax (its own, tested writer; restoring would cost twice the
    model in memory) the checkpoint's metadata must list the same arrays, shapes and dtypes and
    ``vgg_flax.json`` the same name."""
    if fmt == "orbax":
        import orbax.checkpoint as ocp

        from vgg_flax import checkpoint
        info = checkpoint.read_info(path)
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(Path(path).absolute() / "variables")  # orbax wants absolute paths
        tree = getattr(meta, "item_metadata", meta)
        tree = tree.tree if hasattr(tree, "tree") else tree
        got = {k: f"{np.dtype(m.dtype).name}{tuple(m.shape)}" for k, m in _flatten(dict(tree))}
        ok = info.get("name") == name and got == dict(expected)
    else:
        got = digests(read_flax(path, name, fields)[2])
        release_memory()
        ok = got == dict(expected)
    if not ok:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ConversionError(f"internal error: the {fmt} output differs from the converted arrays "
                              f"at {', '.join(bad[:4]) or 'its name'}; nothing written")


# -- the whole jobs -----------------------------------------------------------------------------
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
    verification: Verification | None
    notes: list[str]

    def lines(self) -> list[str]:
        lines = []
        if self.verification is not None:
            lines.append(self.verification.line())
        lines.append(f"{self.name}: {self.num_params:,} parameters, {self.source} "
                     f"({_mb(self.source_bytes)}) -> {self.out} ({self.fmt}, {_mb(self.out_bytes)}) "
                     f"in {self.seconds:.1f} s, peak RSS {_mb(self.peak_rss)}")
        return lines


def _num_params(variables) -> int:
    return int(sum(a.size for _, a in _flatten(variables.get("params", {}))))


def torch_to_flax(name: str, weights: str | os.PathLike | None = None,
                  out: str | os.PathLike | None = None, *, fmt: str | None = None,
                  verify_outputs: bool = True, images: Sequence[str | os.PathLike] = (),
                  force: bool = False, rtol: float = 1e-4, verify_batch: int = 4,
                  progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                  **prepare_kwargs) -> Summary:
    """Convert torch weights for VGG ``name`` and write them to ``out``; see the module doc.

    Raises ConversionError on bad input (nothing written). When verification is over
    tolerance the output is not written and the returned Summary's ``verification.ok`` is False.
    """
    start = time.perf_counter()
    out_path = Path(out) if out is not None else None
    fmt = format_for(out_path, fmt)
    out_path = out_path or default_out(name, fmt)
    if (out_path.exists() or out_path.is_symlink()) and not force:
        raise ConversionError(f"{out_path} exists; pass --force to overwrite it")
    _check_name(name)
    prep = prepare(name, weights, progress=progress, **prepare_kwargs)
    for n in prep.notes:
        log(f"note: {n}")
    in_channels = prep.tensors["features.0.weight"].shape[1]
    # Inputs (and --image files) are read before any work, so a bad image fails fast.
    x = verification_inputs(name, prep.module, in_channels, images, verify_batch) \
        if verify_outputs else None
    variables = map_to_flax(prep.tensors, prep.module, prep.dtype, progress)
    num_params = _num_params(variables)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out_path, "tmp")
    extra = {"converted_from": {"source": prep.source.label, "notes": prep.notes}}
    result = None
    try:
        with interrupt_after():
            write_flax(tmp, variables, name, prep.module, prep.fields, fmt, extra)
        release_memory()
        if verify_outputs:
            # The Flax side on the converted arrays in place (no second copy), then the torch
            # side once they are freed; the file is then checked against their digests.
            flax_out = _flax_outputs(prep.module, variables, x, output_names(prep.module))
            written = digests(variables) if fmt != "orbax" else _shapes(variables)
        del variables
        gc.collect()  # jax's aliases of the arrays sit in reference cycles
        release_memory()
        if verify_outputs:
            result = verify(name, prep.module, lambda: _reference_tensors(prep), None,
                            in_channels=in_channels, rtol=rtol, x=x, flax_out=flax_out)
            check_written(tmp, fmt, name, prep.fields, written)
            result.readback = fmt != "orbax"
        settle(tmp, out_path, force, result)
    except BaseException:
        _remove(tmp)
        raise
    return Summary(name, num_params, prep.source.label, prep.file.size, out_path, fmt,
                   _path_size(out_path) if out_path.exists() else 0,
                   time.perf_counter() - start, peak_rss_bytes(), result, prep.notes)


def flax_to_torch(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                  verify_outputs: bool = True, name: str | None = None,
                  overrides: Mapping[str, Any] | None = None, rtol: float = 1e-4,
                  images: Sequence[str | os.PathLike] = (), verify_batch: int = 4) -> Summary:
    """A vgg_flax checkpoint (orbax dir, or our .safetensors / a flax .msgpack with ``name``) ->
    a torch state_dict file (.pth or .safetensors) that torchvision's ``<name>()`` loads with
    ``strict=True`` (SSD: ``SSDFeatureExtractorVGG``'s keys without extra.1-4)."""
    from vgg_flax import weights
    start = time.perf_counter()
    src, out_path = Path(src), Path(out)
    if out_path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ConversionError(f"--out {out_path}: use a .pth, .pt or .safetensors file name")
    if (out_path.exists() or out_path.is_symlink()) and not force:
        raise ConversionError(f"{out_path} exists; pass --force to overwrite it")
    if name is not None:
        _check_name(name)
    name, module, variables = read_flax(src, name, overrides)
    src_bytes = _path_size(src)
    num_params = _num_params(variables)
    in_channels = np.asarray(variables["params"]["conv1_1"]["kernel"]).shape[2]
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
        raise ConversionError(f"{src} lacks {err} needed by {name}; was it written for another "
                              "VGG variant?") from None
    del variables
    x = verification_inputs(name, module, in_channels, images, verify_batch) \
        if verify_outputs else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out_path, "tmp")
    result = None
    try:
        if out_path.suffix == ".safetensors":
            write_safetensors(tmp, list(sd.items()))
        else:
            import torch
            torch.save(OrderedDict((k, _np_to_torch(v)) for k, v in sd.items()), tmp)
        del sd
        if verify_outputs:
            def torch_side():
                out = _TorchWeights()
                for k, t in torch_io.open_weights(tmp).items():
                    if k.endswith("num_batches_tracked"):
                        continue
                    raw = t.torch()
                    out[k] = raw.float()
                    if t.mmapped and out[k] is raw:
                        out.file_backed.append(k)
                return out
            result = verify(name, module, torch_side, lambda: read_flax(src, name, overrides)[2],
                            in_channels=in_channels, rtol=rtol, x=x)
        settle(tmp, out_path, force, result)
    except BaseException:
        _remove(tmp)
        raise
    return Summary(name, num_params, str(src), src_bytes, out_path,
                   "safetensors" if out_path.suffix == ".safetensors" else "pth",
                   out_path.stat().st_size if out_path.exists() else 0,
                   time.perf_counter() - start, peak_rss_bytes(), result, [])


def _np_to_torch(a: np.ndarray):
    import torch
    if not a.flags.writeable:  # e.g. views into a msgpack buffer; torch wants its own memory
        a = a.copy()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# -- command lines ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"error: {message} (see --help)\n")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConversionError(f"--set {item!r}: write FIELD=VALUE, e.g. --set hidden_size=1024")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _run(job: Callable[[], Summary]) -> int:
    try:
        summary = job()
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    if summary.verification is not None and not summary.verification.ok:
        print(f"error: outputs differ beyond the tolerance; {summary.out} was not written "
              "(--no-verify writes it unchecked)", file=sys.stderr)
        return 1
    return 0


def torch_to_flax_main(argv: Sequence[str] | None = None) -> int:
    """``vgg-torch-to-flax`` / ``python convert/torch_to_flax.py``."""
    p = _Parser(prog="torch_to_flax.py", description=(
        "Convert torchvision (or SSD, or your own) VGG weights to Flax and check the result "
        "against torchvision's model. Names: " + ", ".join(registry.list_models())))
    p.add_argument("name", help="VGG name, e.g. vgg16, vgg19_bn, vgg16_ssd")
    p.add_argument("--weights", help="torchvision weights (IMAGENET1K_V1, IMAGENET1K_FEATURES, "
                   "DEFAULT; default: IMAGENET1K_V1, for vgg16_ssd IMAGENET1K_FEATURES) or a "
                   ".pth/.pt/.safetensors file (state_dict or checkpoint with one under "
                   "'state_dict'/'model'; DataParallel 'module.' prefixes are fine; timm's layout too), or "
                   "hf:OWNER/REPO[/FILE] from the Hugging Face hub, e.g. hf:timm/vgg16.tv_in1k")
    p.add_argument("--out", help="output path (default out/NAME, plus .safetensors/.msgpack)")
    p.add_argument("--format", choices=FORMATS, help="orbax (default; read by vgg_flax.load), "
                   "safetensors or msgpack (flax.serialization); default from --out's suffix")
    p.add_argument("--no-verify", action="store_true", help="skip the torchvision comparison")
    p.add_argument("--image", nargs="+", default=[], metavar="FILE",
                   help="also verify on these images (preprocessed as the weights expect)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--num-classes", type=int, help="classes of the weights' head (e.g. 10 for a "
                   "fine-tuned head)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="other VGG fields the weights were built with, e.g. hidden_size=1024, "
                        "pool_size=1,1, width=0.5 (as vgg_flax.create)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype written "
                   "(default float32: fp16/bf16 weights are widened exactly; keep: as stored)")
    p.add_argument("--ssd-from-classifier", action="store_true", help="vgg16_ssd from vgg16 "
                   "classifier weights: conv6/conv7 decimated from fc6/fc7 (SSD's reduced fc)")
    p.add_argument("--ssd-features-only", action="store_true", help="vgg16_ssd from weights "
                   "without conv6/conv7: initialise them as torchvision's ssd300_vgg16 does")
    p.add_argument("--seed", type=int, default=0, help="seed for --ssd-features-only's init")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="verification tolerance on max |diff| / max |torch output|")
    p.add_argument("--verify-batch", type=int, default=4, metavar="N",
                   help="seeded random inputs to verify on (besides --image)")
    args = p.parse_args(argv)

    def job() -> Summary:
        return torch_to_flax(args.name, args.weights, args.out, fmt=args.format,
                             verify_outputs=not args.no_verify, images=args.image,
                             force=args.force, rtol=args.rtol, num_classes=args.num_classes,
                             overrides=_parse_sets(args.set), dtype=args.dtype,
                             ssd_from_classifier=args.ssd_from_classifier,
                             ssd_features_only=args.ssd_features_only, seed=args.seed,
                             verify_batch=args.verify_batch)
    return _run(job)


def flax_to_torch_main(argv: Sequence[str] | None = None) -> int:
    """``vgg-flax-to-torch`` / ``python convert/flax_to_torch.py``."""
    p = _Parser(prog="flax_to_torch.py", description=(
        "Convert a vgg_flax checkpoint back to a torch state_dict that torchvision's model loads "
        "with strict=True, and check it against the Flax model."))
    p.add_argument("src", help="checkpoint directory (vgg_flax.save / torch_to_flax.py), or a "
                   ".safetensors written by torch_to_flax.py, or a flax .msgpack with --name")
    p.add_argument("--out", required=True, help="output file: .pth/.pt or .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip the torchvision comparison")
    p.add_argument("--image", nargs="+", default=[], metavar="FILE")
    p.add_argument("--name", help="VGG name (only for .msgpack input, which does not record it)")
    p.add_argument("--num-classes", type=int, help="with --name: classes of the head")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --name: other VGG fields")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--verify-batch", type=int, default=4, metavar="N")
    args = p.parse_args(argv)

    def job() -> Summary:
        overrides = _parse_sets(args.set)
        if args.num_classes is not None:
            overrides["num_classes"] = args.num_classes
        return flax_to_torch(args.src, args.out, force=args.force,
                             verify_outputs=not args.no_verify, name=args.name,
                             overrides=overrides, rtol=args.rtol, images=args.image,
                             verify_batch=args.verify_batch)
    return _run(job)
