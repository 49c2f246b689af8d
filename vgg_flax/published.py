"""``module, variables = vgg_flax.pretrained("vgg16")``: ImageNet weights in one call, torch optional.

Where the weights come from, in order:

1. vgg_flax's cache (``$VGG_FLAX_CACHE``, default ``~/.cache/vgg_flax``): a copy converted
   before, ``<cache>/<name>.<weights>`` (a ``vgg_flax.save`` directory);
2. the Hugging Face hub, ``timm/<name>.tv_in1k`` (torchvision's weights as timm publishes them,
   ``model.safetensors``), through ``huggingface_hub`` and its cache (``HF_HOME``,
   ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` apply; its progress bar). Read as numpy: no torch;
3. torchvision's weights through torch's hub cache (``TORCH_HOME``), when torch is installed
   (the only source of ``vgg16_ssd``'s ``IMAGENET1K_FEATURES``).

A converted result goes into vgg_flax's cache (written to a temporary name, then renamed), so
the second call reads it back and converts nothing. Conversion is the converter's own
(``vgg_flax.convert.mapping.prepare``): the same layouts and the same strict shape checks.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vgg_flax import arch, checkpoint, registry
from vgg_flax.hub import HubUnreachable, hf_repo, hub_file
from vgg_flax.model import INITS, VGG, abstract_variables
from vgg_flax.registry import SSD_NAME, default_weights
from vgg_flax.errors import ConversionError, WeightMismatchError, WeightsUnavailableError
from vgg_flax.weights import on_device

CACHE_ENV = "VGG_FLAX_CACHE"
# Fields a caller may change on pretrained weights: none of them changes a shape, except
# num_classes, which re-initialises fc8, and include_top=False, which drops fc6-fc8.
_FREE_FIELDS = ("num_classes", "include_top", "taps", "dense", "dtype", "param_dtype", "conv",
                "precision", "dropout_rate", "bn_momentum")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """vgg_flax's cache directory: ``cache_dir``, else ``$VGG_FLAX_CACHE``, else ~/.cache/vgg_flax."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vgg_flax").expanduser()


def _member(name: str, weights: str | None) -> str:
    if name not in registry.list_models():
        raise ValueError(f"unknown VGG {name!r}; choose one of: {', '.join(registry.list_models())}")
    published = default_weights(name)
    if arch.VARIANTS[name].torchvision is None and name != SSD_NAME:
        raise ValueError(f"{name} has no published weights (only the torchvision variants and "
                         f"{SSD_NAME} do); build it with vgg_flax.create({name!r}) and train it")
    member = published if weights in (None, "DEFAULT") else str(weights).split(".")[-1]
    if member != published:
        raise ValueError(f"{name} has no {weights!r} weights; its published weights are "
                         f"{published!r} (for your own files use convert/torch_to_flax.py "
                         "--weights PATH, then vgg_flax.load)")
    return member


def _hf_reason(err: BaseException) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    if isinstance(err, HubUnreachable):
        return (f"no answer: {err}; not in the HF cache {constants.HF_HUB_CACHE} either; set "
                "HF_HUB_OFFLINE=1 to look only in the caches")
    if isinstance(err, LocalEntryNotFoundError):
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "cannot connect"
        return f"{how} and it is not in the HF cache {constants.HF_HUB_CACHE}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 120 else text[:117] + "..."


def _from_cache(path: Path, name: str) -> dict[str, Any]:
    try:
        info = checkpoint.read_info(path)
        if info.get("name") != name or info.get("overrides"):
            raise ValueError(f"it holds {info.get('name')} {info.get('overrides') or ''}")
        _, variables = checkpoint.read(path)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(f"vgg_flax's cache entry {path} is not {name}'s pretrained "
                                      f"weights ({err}); delete it and call again") from None
    return variables


def _store(path: Path, variables: Mapping[str, Any], name: str, module: VGG,
           extra: Mapping[str, Any]) -> None:
    """Cache the converted variables, atomically; failing to cache is not failing to load."""
    try:
        checkpoint.save(path, variables, name, module=module, extra=dict(extra))
    except FileExistsError:
        pass  # another process cached it first: same weights
    except OSError as err:
        if not (path / "vgg_flax.json").exists():  # else: another process won the rename
            warnings.warn(f"could not cache {name}'s converted weights at {path} ({err}); the "
                          f"next call converts them again (set {CACHE_ENV} to a writable "
                          "directory)", stacklevel=3)


def _torch_hub_file(name: str) -> Path:
    """Where torchvision's weights API caches ``name``'s file (``convert.sources.hub_cache_file``),
    found as ``torch.hub.get_dir()`` finds it but without importing torch unless it is."""
    import sys
    if "torch" in sys.modules:  # torch.hub.set_dir may have moved it
        home = Path(sys.modules["torch"].hub.get_dir())
    else:
        home = Path(os.environ.get("TORCH_HOME") or Path(
            os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "torch").expanduser() / "hub"
    return home / "checkpoints" / registry.metadata(name)["weights_url"].rsplit("/", 1)[-1]


def _convert(name: str, member: str, cache: Path, progress: bool) -> dict[str, Any]:
    """Find a source (HF hub, then torchvision), convert, cache. WeightsUnavailableError if none."""
    from huggingface_hub import constants

    from vgg_flax.convert import mapping, sources
    from huggingface_hub.errors import LocalEntryNotFoundError
    looked = [f"vgg_flax's cache {cache} (no copy)"]
    prep = None
    offline = constants.HF_HUB_OFFLINE
    repo = hf_repo(name)
    if repo is None:
        looked.append(f"the Hugging Face hub (timm publishes no {name} {member})")
    else:
        from huggingface_hub.errors import EntryNotFoundError
        try:
            path = hub_file(repo, progress=progress)
        except (OSError, EntryNotFoundError) as err:
            offline = offline or isinstance(err, (HubUnreachable, LocalEntryNotFoundError))
            looked.append(f"the Hugging Face hub {repo} ({_hf_reason(err)})")
        else:
            prep = mapping.prepare(name, str(path), progress=progress)
            prep.source.enum = f"hf:{repo}"
    if prep is None:
        tv = f"torchvision's {member} weights in torch's hub cache"
        if not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")):
            looked.append(f"{tv} (torch/torchvision not installed)")
        elif offline and not _torch_hub_file(name).is_file():  # torch's imports take seconds,
            looked.append(f"{tv} ({_torch_hub_file(name)} absent)")  # a download would fail
        else:
            cached = sources.hub_cache_file(sources.weights_enum(name)[member])
            try:
                prep = mapping.prepare(name, member, progress=progress)
            except ConversionError:
                if cached.is_file():
                    raise  # the file is there but unusable: that error says why
                looked.append(f"{tv} ({cached} absent, and downloading it failed)")
    if prep is None:
        src = f"hf:{repo}" if repo else member
        raise WeightsUnavailableError(
            f"no {name} {member} weights here; looked in: {'; '.join(looked)}. Where there is "
            f"network, run `python convert/torch_to_flax.py {name} --weights {src} --out "
            f"{cache.name}` and copy that directory to {cache}")
    for note in prep.notes:
        warnings.warn(f"{name}: {note}", stacklevel=3)
    variables = mapping.map_to_flax(prep.tensors, prep.module, prep.dtype, progress)
    _store(cache, variables, name, prep.module,
           {"converted_from": {"source": prep.source.label, "notes": prep.notes}})
    return variables


def fit(variables: Mapping[str, Any], name: str, module: VGG, seed: int = 0) -> dict[str, Any]:
    """``create(name)``'s pretrained ``variables`` for ``module`` (the same variant with other
    fields): cast to its ``param_dtype``, fc6-fc8 dropped without a top, fc8 re-initialised
    (torchvision's N(0, 0.01), zero bias, ``seed``) when ``num_classes`` differs, with a warning.
    Any other difference: WeightMismatchError. Leaves stay where they are (host arrays keep
    their memory where the dtype is unchanged)."""
    import jax
    abstract = abstract_variables(module, 3)
    out: dict[str, Any] = {}
    bad, fresh = [], []
    key = jax.random.key(seed)
    for collection, layers in abstract.items():
        for layer, leaves in layers.items():
            for leaf, spec in leaves.items():
                src = variables.get(collection, {}).get(layer, {}).get(leaf)
                if src is not None and tuple(np.shape(src)) == tuple(spec.shape):
                    value = np.asarray(src).astype(spec.dtype, copy=False)
                elif layer == "fc8" and src is not None:
                    fresh.append(f"{layer}/{leaf}")
                    init = INITS["fc"] if leaf == "kernel" else (lambda k, s, d: np.zeros(s, d))
                    value = init(jax.random.fold_in(key, len(fresh)), spec.shape, spec.dtype)
                else:
                    got = "missing" if src is None else f"{tuple(np.shape(src))}"
                    bad.append(f"{layer}/{leaf}: pretrained {got}, wanted {tuple(spec.shape)}")
                    continue
                out.setdefault(collection, {}).setdefault(layer, {})[leaf] = value
    if bad:
        raise WeightMismatchError(
            f"pretrained {name} weights do not fit these fields ({len(bad)} leaves: "
            f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); pretrained() may change "
            f"only {', '.join(_FREE_FIELDS)}: build other shapes with vgg_flax.create and train")
    if fresh:
        old = np.shape(variables["params"]["fc8"]["kernel"])[-1]
        warnings.warn(f"{name}: the pretrained head has {old} classes; fc8 is re-initialised "
                      f"for num_classes={module.num_classes} (N(0, 0.01) weights, zero bias, "
                      f"seed {seed}): train it before use", stacklevel=3)
    return out


def pretrained(name: str, weights: str | None = None, *, cache_dir: str | os.PathLike | None = None,
               progress: bool = True, seed: int = 0, **overrides: Any) -> tuple[VGG, dict[str, Any]]:
    """(module, variables) of VGG ``name`` with its published ImageNet weights.

    ``weights``: ``"IMAGENET1K_V1"`` (the default; ``"DEFAULT"`` is the same), or for
    ``vgg16_ssd`` torchvision's ``"IMAGENET1K_FEATURES"`` (SSD300's backbone: conv1_1-conv5_3
    from ssd.pytorch, conv6/conv7 initialised as torchvision's ssd300_vgg16 does).
    ``overrides`` go to ``vgg_flax.create``: ``num_classes=10`` re-initialises fc8 (with a
    warning), ``include_top=False``, ``taps=(...)``, ``dense``, ``dtype``, ``param_dtype``,
    ``conv`` ... Fields that change other shapes raise ``WeightMismatchError``.
    ``cache_dir`` replaces ``$VGG_FLAX_CACHE``; ``progress`` shows download/convert bars;
    ``seed`` draws a re-initialised head. See the module docstring for where it looks;
    ``WeightsUnavailableError`` when nothing has the weights. The variables are ``jax.Array``s
    on the default device.
    """
    member = _member(name, weights)
    module = registry.create(name, **overrides)
    cache = cache_root(cache_dir) / f"{name}.{member}"
    if (cache / "vgg_flax.json").is_file():
        variables = _from_cache(cache, name)
    else:
        variables = _convert(name, member, cache, progress)
    variables = fit(variables, name, module, seed)  # the host arrays as read, where they fit
    return module, on_device(variables, consume=True)


def weights_argument(spec: str | os.PathLike, **overrides: Any
                     ) -> tuple[dict[str, Any], VGG, dict[str, Any]]:
    """A command line's ``--weights``: a ``vgg_flax.save`` directory (``vgg_flax.load``) or a
    model name with published weights (``pretrained``), as (``vgg_flax.json``'s contents,
    module, variables); a name gives ``{"name": spec}``."""
    if checkpoint.is_model_name(spec):
        return ({"name": spec}, *pretrained(str(spec), **overrides))
    info = checkpoint.read_info(spec)
    return (info, *checkpoint.load(spec, **overrides))
