"""Every torch key layout we read, renamed to the one ``vgg_flax.weights`` maps from.

Classifiers: ``CLASSIFIER_LAYOUTS`` (torchvision's ``VGG``; timm's, whose classifier runs as
convolutions: ``vgg_flax.timm_layout``).
SSD backbones: torchvision's ``ssd300_vgg16`` (``backbone.`` keys), its bare
``SSDFeatureExtractorVGG``, ssd.pytorch's ``vgg16_reducedfc.pth`` (a ``ModuleList``: ``0.weight``
... ``33.bias``) and ssd.pytorch's full SSD (``vgg.N``, ``L2Norm.weight``); or built from
classifier weights (SSD's decimated fc6/fc7, or conv6/conv7 initialised as torchvision does).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Iterable, Mapping

import numpy as np

from vgg_flax import arch, timm_layout
from vgg_flax.errors import ConversionError
from vgg_flax.registry import SSD_NAME
from vgg_flax.torch_io import Tensor


@dataclasses.dataclass(frozen=True)
class ClassifierLayout:
    """A classifier's torch key layout: how to recognise it and how to rename it to
    torchvision's (``None``: recognised, not read yet; ``hint`` then says what to do)."""
    detect: Callable[[Collection[str]], bool]
    to_torchvision: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None
    hint: str = ""


def _is_torchvision(keys: Collection[str]) -> bool:
    return bool(keys) and all(k.startswith(("features.", "classifier.")) for k in keys)


def _reshaped(src: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``src`` seen with another shape of the same rows (timm's classifier convolutions)."""
    tail = shape[1:]
    return Tensor(shape, src.dtype, lambda sl: src.rows(sl).reshape((-1,) + tail),
                  lambda: src.torch().reshape(shape), src.release, src.mmapped)


# One entry per layout; SSD layouts are detected first (``detect_layout``).
CLASSIFIER_LAYOUTS: dict[str, ClassifierLayout] = {
    "torchvision": ClassifierLayout(_is_torchvision, lambda t: t),
    # timm's classifier convolutions are torchvision's Linear weights reshaped: no copies
    "timm": ClassifierLayout(timm_layout.is_timm_layout,
                             lambda t: timm_layout.to_torchvision(t, _reshaped)),
}


def detect_layout(keys: Iterable[str]) -> str:
    """One of: ssd300 (torchvision detector), ssd_extractor (its backbone), ssd_pytorch_base
    (``vgg16_reducedfc.pth``), ssd_pytorch (full ssd.pytorch SSD), a ``CLASSIFIER_LAYOUTS`` key,
    or unknown."""
    keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    if any(k.startswith("backbone.") for k in keys):
        return "ssd300"
    if any(k.startswith("vgg.") for k in keys) and any(k.startswith("L2Norm") for k in keys):
        return "ssd_pytorch"
    if keys and all(k.split(".")[0].isdigit() for k in keys):
        return "ssd_pytorch_base"
    if "scale_weight" in keys or any(k.startswith("extra.") for k in keys):
        return "ssd_extractor"
    for name, layout in CLASSIFIER_LAYOUTS.items():
        if layout.detect(keys):
            return name
    return "unknown"


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    while tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return dict(tensors)


def array_tensor(a: np.ndarray) -> Tensor:
    """An in-memory ``Tensor`` (derived weights: decimated fc, initial values)."""
    def to_torch():
        import torch
        return torch.from_numpy(np.ascontiguousarray(a))
    return Tensor(a.shape, a.dtype, lambda sl: np.array(a[sl]), to_torch)


def decimate_fc(fc6_w: np.ndarray, fc6_b: np.ndarray, fc7_w: np.ndarray, fc7_b: np.ndarray,
                in_channels: int = 512, grid: int = 7):
    """SSD/DeepLab's "reduced fc": classifier fc6/fc7 -> atrous conv6/conv7 (torch layouts).

    fc6 (4096, 512*7*7) is viewed as (4096, 512, 7, 7) and keeps every 4th output channel and
    every 3rd spatial position -> conv6 (1024, 512, 3, 3); fc7 (4096, 4096) keeps every 4th row
    and column -> conv7 (1024, 1024, 1, 1); biases keep every 4th entry.
    """
    return decimate_rows(fc6_w[::4], fc6_b, fc7_w, fc7_b, in_channels, grid)


def decimate_rows(fc6_rows: np.ndarray, fc6_b, fc7_w, fc7_b, in_channels: int = 512,
                  grid: int = 7):
    """``decimate_fc`` given only fc6's rows 0, 4, 8 ... (all that it keeps)."""
    conv6 = fc6_rows.reshape(fc6_rows.shape[0], in_channels, grid, grid)[:, :, ::3, ::3]
    conv7 = fc7_w[::4, ::4]
    return (np.ascontiguousarray(conv6), np.ascontiguousarray(fc6_b[::4]),
            np.ascontiguousarray(conv7.reshape(conv7.shape + (1, 1))),
            np.ascontiguousarray(fc7_b[::4]))


def to_library_layout(tensors: Mapping[str, Tensor], name: str, module, *,
                      ssd_from_classifier: bool = False, ssd_features_only: bool = False,
                      seed: int = 0) -> tuple[dict[str, Tensor], list[str]]:
    """Rename any known layout to the keys ``vgg_flax.from_torch`` expects for ``name``.

    Returns (tensors, notes): notes say what was dropped or derived, for the user to read.
    """
    notes: list[str] = []
    t = {k: v for k, v in strip_prefix(tensors, "module.").items()
         if not k.endswith("num_batches_tracked")}
    layout = detect_layout(t)
    classifier = CLASSIFIER_LAYOUTS.get(layout)
    if classifier is not None and classifier.to_torchvision is None:
        raise ConversionError(f"this is {layout}'s layout: {classifier.hint}")
    if module.head != "ssd":
        if classifier is None and layout != "unknown":
            raise ConversionError(f"these are SSD backbone weights ({layout} layout), not a "
                                  f"{name} classifier; convert them as {SSD_NAME}")
        if ssd_from_classifier or ssd_features_only:
            raise ConversionError(f"--ssd-from-classifier/--ssd-features-only build {SSD_NAME}; "
                                  f"convert as {SSD_NAME}, not {name}")
        if classifier is not None:
            t = classifier.to_torchvision(t)
        if not module.include_top:
            dropped = [k for k in t if k.startswith("classifier.")]
            for k in dropped:
                del t[k]
            if dropped:
                notes.append(f"include_top=False: dropped the {len(dropped)} classifier tensors")
        return t, notes
    if classifier is not None:
        if not (ssd_from_classifier or ssd_features_only):
            raise ConversionError(
                f"these are classification weights ({layout} layout), not an SSD backbone: pass "
                f"--ssd-from-classifier to build conv6/conv7 from fc6/fc7 as SSD did, or "
                f"--ssd-features-only to keep the convolutions and initialise conv6/conv7 as "
                f"torchvision's ssd300_vgg16 does")
        return ssd_from_classifier_weights(classifier.to_torchvision(t), module,
                                           ssd_from_classifier, seed, notes), notes
    return ssd_backbone(t, layout, module, notes), notes


def _ssd_split(module) -> tuple[int, int]:
    """(pool4's torch index, where ssd.pytorch's pool5 sits): torchvision's
    ``SSDFeatureExtractorVGG`` keeps ``features`` up to pool4 and puts the rest in ``extra.0``."""
    feats = arch.features_layers(module.cfg, module.batch_norm, module.width)
    pool4 = next(layer.torch_index for layer in feats if layer.name == "pool4")
    return pool4, feats[-1].torch_index + 1


def _initial_scale(module) -> Tensor:
    return array_tensor(np.full((arch.scale(512, module.width),), 20.0, np.float32))


def ssd_backbone(t: dict[str, Tensor], layout: str, module, notes: list[str]) -> dict[str, Tensor]:
    """An SSD layout -> torchvision ``SSDFeatureExtractorVGG``'s keys without extra.1-4."""
    pool4, tail = _ssd_split(module)
    if layout == "ssd300":
        kept = {k[len("backbone."):]: v for k, v in t.items() if k.startswith("backbone.")}
        if len(t) - len(kept):
            notes.append(f"dropped {len(t) - len(kept)} tensors of SSD300's detection heads (not VGG)")
        t, layout = kept, "ssd_extractor"
    if layout == "ssd_pytorch":
        kept = {k[len("vgg."):]: v for k, v in t.items() if k.startswith("vgg.")}
        extra = len(t) - len(kept) - ("L2Norm.weight" in t)
        if "L2Norm.weight" in t:
            kept["scale_weight"] = t["L2Norm.weight"]
        t, layout = kept, "ssd_pytorch_base"
        notes.append(f"dropped {extra} tensors of ssd.pytorch's extras/loc/conf layers (not VGG)")
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
            t["scale_weight"] = _initial_scale(module)
            notes.append("ssd.pytorch keeps conv4_3's L2Norm scale outside the VGG base: set to "
                         "its initial value 20")
    elif layout == "ssd_extractor":
        extras = [k for k in t if k.startswith("extra.") and k.split(".")[1] != "0"]
        for k in extras:
            del t[k]
        if extras:
            notes.append(f"dropped {len(extras)} tensors of SSD's extra blocks extra.1-4 "
                         "(SSD's own layers after conv7, not VGG)")
    return t


def ssd_from_classifier_weights(t: dict[str, Tensor], module, decimate: bool, seed: int,
                                notes: list[str]) -> dict[str, Tensor]:
    """torchvision vgg16 weights -> SSD backbone keys: features split at pool4, conv6/conv7
    decimated from fc6/fc7 (``decimate``) or initialised as ``ssd300_vgg16`` does."""
    pool4, tail = _ssd_split(module)
    head = f"extra.0.{tail - pool4}"
    out = {}
    for k, v in t.items():
        if k.startswith("features."):
            i, leaf = k.split(".")[1:]
            if int(i) < pool4:
                out[k] = v
            elif int(i) < tail:
                out[f"extra.0.{int(i) - pool4}.{leaf}"] = v
    if decimate:
        need = ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]
        shapes_ok = (all(k in t for k in need) and t["classifier.0.weight"].shape == (4096, 512 * 49)
                     and t["classifier.3.weight"].shape == (4096, 4096))
        if not shapes_ok or module.width != 1 or module.hidden_size != 1024:
            raise ConversionError("--ssd-from-classifier needs torchvision vgg16 classifier "
                                  "weights (fc6 4096x25088, fc7 4096x4096)")
        fc6 = t["classifier.0.weight"]
        # Only every 4th row of fc6 is needed: read those, not the 400 MB matrix.
        w6 = fc6.rows(slice(None, None, 4))
        fc6.release()
        parts = decimate_rows(w6, t["classifier.0.bias"].numpy(), t["classifier.3.weight"].numpy(),
                              t["classifier.3.bias"].numpy())
        t["classifier.3.weight"].release()
        if not all(np.isfinite(p).all() for p in parts):
            raise ConversionError("the classifier weights hold NaN/inf (torchvision's "
                                  "IMAGENET1K_FEATURES has no classifier): use IMAGENET1K_V1 "
                                  "with --ssd-from-classifier, or --ssd-features-only")
        for leaf, a in zip(("1.weight", "1.bias", "3.weight", "3.bias"), parts):
            out[f"{head}.{leaf}"] = array_tensor(a)
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
            out[f"{head}.{idx}.weight"] = array_tensor(w.numpy())
            out[f"{head}.{idx}.bias"] = array_tensor(np.zeros(hidden, np.float32))
        notes.append(f"the weights hold no conv6/conv7: initialised as torchvision's ssd300_vgg16 "
                     f"does (Xavier uniform, zero bias; seed {seed}); train them before use")
    if module.l2norm:
        out["scale_weight"] = _initial_scale(module)
        notes.append("conv4_3's L2Norm scale set to SSD's initial value 20")
    return out
