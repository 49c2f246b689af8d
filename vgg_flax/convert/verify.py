"""Verification: torchvision's own model and the Flax model on the same inputs, one after the
other (never both models in memory), float32, ``jax.default_matmul_precision("highest")``.

It fails when max |flax - torch| / max |torch| > ``rtol`` (1e-4). Top-5 agreement is reported,
not required (random weights have near-ties). Inputs: a seeded normal batch, plus image files
preprocessed by ``vgg_flax.preprocess`` as the weights expect.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vgg_flax import arch, registry, torch_io
from vgg_flax.errors import ConversionError
from vgg_flax.convert.formats import flatten, unflatten
from vgg_flax.convert.memory import release_memory
from vgg_flax.images import load_image, verification_input


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


class TorchWeights(dict):
    """name -> torch tensor, and which of them are views of the memory-mapped file."""

    def __init__(self):
        super().__init__()
        self.file_backed: list[str] = []


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
        # The backbone on the meta device (its weights are assigned from the file: building
        # vgg16 on the CPU would initialise 138M parameters only to drop them); SSD's extra
        # blocks 1-4 are not VGG: real, random, and not compared.
        with torch.device("meta"):
            features = torchvision.models.vgg16().features
        torch.manual_seed(0)
        return SSDFeatureExtractorVGG(features, highres=False).eval()
    variant = arch.VARIANTS[name]
    base = registry.create(name)
    std = ("cfg", "batch_norm", "width", "hidden_size", "pool_size", "include_top", "bn_epsilon",
           "lrn_size", "lrn_alpha", "lrn_beta", "lrn_k")
    same = all(getattr(module, f) == getattr(base, f) for f in std)
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
    """(N, H, W, C) float32: ``batch`` seeded normal images, then ``images`` as
    ``vgg_flax.images.verification_input`` prepares them for the weights (SSD: the
    detector's 300x300 square; other channel counts: the grey level in each channel)."""
    size = registry.metadata(name)["input_size"][0]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch, size, size, in_channels), np.float32)]
    for f in images:
        try:
            a = verification_input(load_image(f, exif_transpose=False), name,
                                   3 if in_channels == 3 else 1)
        except ValueError as err:
            raise ConversionError(f"cannot read image {f} ({err}); pass a JPEG/PNG file") from None
        xs.append(np.repeat(a, in_channels // a.shape[-1], axis=-1)[None])
    return np.concatenate(xs)


def output_names(module) -> tuple[str, ...]:
    """What verification compares: logits, pool5 (no classifier) or SSD's two feature maps."""
    if module.head == "ssd":
        return ("conv4_3_norm", "relu7")
    return ("logits",) if module.include_top else ("pool5",)


def torch_outputs(name, module, tensors: Mapping[str, Any], x: np.ndarray, in_channels: int,
                  file_backed: Iterable[str] = ()):
    """torchvision's model on ``x``; ``file_backed`` names the tensors that are memory-mapped
    from the weights file, whose pages are handed back once used."""
    import torch
    mapped = {tensors[k].data_ptr() for k in file_backed}
    model = torch_reference(name, module, in_channels)
    sd = OrderedDict((k, v) for k, v in tensors.items())
    result = model.load_state_dict(sd, strict=module.head != "ssd", assign=True)
    if module.head == "ssd":
        bad = [k for k in result.missing_keys
               if not k.startswith(("extra.1", "extra.2", "extra.3", "extra.4"))]
        if bad or result.unexpected_keys:
            raise RuntimeError(f"internal: SSD reference did not take keys "
                               f"{bad or result.unexpected_keys}")

    def drop_pages(layer, inputs, output):
        # Weights are memory-mapped from the file: once a layer has run, hand its pages back,
        # so the whole model is never resident at once (they are re-read for the next input).
        for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
            if t.data_ptr() in mapped and t.is_contiguous():
                torch_io.release_pages(t.data_ptr(), t.numel() * t.element_size())

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


def flax_outputs(module, variables, x: np.ndarray, outputs: Sequence[str]):
    """The Flax model on ``x``, one input at a time (activations of one image, not a batch).

    Leaves go to the device one by one and replace the host leaves in ``variables`` (so the
    caller can go on using them without a second copy): 64-byte-aligned host arrays
    (``map_to_flax``'s) are used in place, others are copied and the host copy dropped.
    """
    import jax
    import jax.numpy as jnp
    device: dict[str, Any] = {}
    for k, _ in flatten(variables):
        node = variables
        *parents, leaf = k.split("/")
        for p in parents:
            node = node[p]
        a = node[leaf]
        aligned = isinstance(a, np.ndarray) and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
        device[k] = jax.device_put(a, may_alias=True) if aligned else jnp.asarray(a)
        del a
        node[leaf] = device[k]
    tree = unflatten(device)
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
    ref = torch_outputs(name, module, tensors, x, in_channels, file_backed)
    del tensors
    gc.collect()  # the torch model is gone before the Flax side loads
    release_memory()
    got = flax_out if flax_out is not None else flax_outputs(module, flax_variables(), x, tuple(ref))
    return compare(ref, got, rtol, x.shape[1])
