"""Where torch weights come from: a path, or torchvision's published weights (its weights API
and torch's hub cache), and the VGG they are for."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any, Mapping

from vgg_flax import arch, registry, torch_io
from vgg_flax.registry import SSD_NAME, default_weights
from vgg_flax.convert import atomic
from vgg_flax.errors import ConversionError

@dataclasses.dataclass
class Source:
    """Where weights came from: a file (``path``), maybe via torchvision's weights API (``enum``)."""
    path: Path
    enum: str | None = None   # e.g. "VGG16_Weights.IMAGENET1K_V1"

    @property
    def label(self) -> str:
        return f"{self.enum} ({self.path})" if self.enum else str(self.path)


def check_name(name: str) -> None:
    if name not in registry.list_models():
        raise ConversionError(f"unknown VGG {name!r}; choose one of: "
                              f"{', '.join(registry.list_models())}")


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or int(num_classes) < 1:
        raise ConversionError(f"--num-classes {num_classes}: the head needs at least 1 class")


def build_module(name: str, num_classes: int | None = None,
                 overrides: Mapping[str, Any] | None = None):
    """``vgg_flax.create(name, ...)`` with CLI-level errors; returns (module, fields given)."""
    check_name(name)
    fields = dict(overrides or {})
    if num_classes is not None:
        check_num_classes(num_classes)
        fields["num_classes"] = int(num_classes)
    try:
        return registry.create(name, **fields), fields
    except (TypeError, ValueError) as err:  # unknown field, or a value create() refuses
        raise ConversionError(f"{err}") from None


def weights_enum(name: str):
    """torchvision's Weights enum class for ``name`` (vgg16_ssd's backbone weights are vgg16's)."""
    tv = "vgg16" if name == SSD_NAME else arch.VARIANTS[name].torchvision
    if tv is None:
        return None
    from torchvision.models import get_model_weights
    return get_model_weights(tv)


def hub_cache_file(weights) -> Path:
    """Where torchvision's weights API caches (and looks for) ``weights``' file."""
    from urllib.parse import urlparse

    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def hf_source(spec: str, progress: bool = True) -> Source:
    """``hf:OWNER/REPO[/FILE]`` (FILE defaults to model.safetensors) via huggingface_hub's cache."""
    from huggingface_hub.errors import EntryNotFoundError

    from vgg_flax.hub import hub_file
    parts = spec[3:].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ConversionError(f"--weights {spec!r}: write hf:OWNER/REPO or hf:OWNER/REPO/FILE, "
                              "e.g. hf:timm/vgg16.tv_in1k")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"
    try:
        return Source(hub_file(repo, filename, progress=progress), spec)
    except (OSError, EntryNotFoundError) as err:
        raise ConversionError(f"cannot get {filename} of Hugging Face repo {repo} "
                              f"({torch_io.short_error(err)}); check the name, or pass --weights "
                              "PATH with the downloaded file") from None


def resolve_weights(name: str, weights: str | os.PathLike | None, progress: bool = True) -> Source:
    """A file for ``weights``: a path, or a torchvision enum member (``IMAGENET1K_V1``,
    ``VGG16_Weights.IMAGENET1K_FEATURES``, ``DEFAULT``) fetched by torchvision's weights API into
    torch's hub cache (progress bar, hash check), or ``hf:OWNER/REPO[/FILE]`` from the Hugging
    Face hub. Offline with nothing cached: ConversionError."""
    if isinstance(weights, str) and weights.startswith("hf:"):
        return hf_source(weights, progress)
    if weights is not None and (isinstance(weights, os.PathLike) or Path(weights).exists()
                                or not re.fullmatch(r"([A-Za-z0-9]+_Weights\.)?[A-Z0-9_]+",
                                                    str(weights))):
        return Source(Path(weights))
    enum_cls = weights_enum(name)
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
        # Ctrl-C in the command line mid-download: torch's partial file goes too
        partial = lambda: [atomic.remove(p) for p in  # noqa: E731
                           cached.parent.glob(glob.escape(cached.name) + ".*.partial")]
        try:
            # torchvision's own API: progress bar, hub cache, hash check. It also unpickles the
            # file (weights_only); we drop that copy and memory-map the cached file instead.
            with atomic.on_interrupt(partial):
                w.get_state_dict(progress=progress, check_hash=True, weights_only=True)
        except KeyboardInterrupt:
            raise
        except (OSError, RuntimeError) as err:  # offline, HTTP (URLError: OSError); bad hash
            raise ConversionError(
                f"cannot fetch torchvision's {label} ({torch_io.short_error(err)}) and it is not "
                f"in torch's hub cache at {cached}; download {w.url} there, or pass --weights PATH "
                "with a .pth/.safetensors file") from None
    return Source(cached, label)
