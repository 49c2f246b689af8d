"""save/load: variables plus everything needed to rebuild the module, on orbax-checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vgg_flax import registry
from vgg_flax.fields import FIELDS
from vgg_flax.model import VGG, variables_mismatch
from vgg_flax.errors import CheckpointError, NotACheckpoint, WeightMismatchError
from vgg_flax.weights import on_device

FORMAT = "vgg_flax/1"
# Every ``VGG`` field is saved with the weights except these: Flax's own, and run-time choices
# of how to compute (convolution kernels, dense evaluation, taps, matmul precision), which a
# user picks when loading (``load(path, conv="xla", taps=...)``), not properties of the weights.
EXCLUDED_FIELDS = frozenset({"parent", "name", "conv", "dense", "taps", "precision"})
DTYPE_FIELDS = ("dtype", "param_dtype")  # saved by name ("bfloat16")


def saved_fields() -> tuple[str, ...]:
    """The ``VGG`` fields ``save`` records: all but ``EXCLUDED_FIELDS``."""
    return tuple(f.name for f in dataclasses.fields(VGG) if f.name not in EXCLUDED_FIELDS)


_REMAKE = "re-create it with vgg_flax.save or convert/torch_to_flax.py"


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()  # numpy scalars, which the field rules accept (np.float32(0.25))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def module_overrides(module: VGG, name: str) -> dict[str, Any]:
    """The saved fields where ``module`` differs from ``create(name)``, in JSON-able form."""
    base = registry.create(name)
    out: dict[str, Any] = {}
    for f in saved_fields():
        value = getattr(module, f)
        if value != getattr(base, f):
            out[f] = jnp.dtype(value).name if f in DTYPE_FIELDS else value
    return json.loads(json.dumps(out, default=_json_scalar))


def overrides_from_json(overrides: dict[str, Any]) -> dict[str, Any]:
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v
    return {k: (jnp.dtype(v) if k in DTYPE_FIELDS else tup(v))
            for k, v in overrides.items()}


def _handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's PyTree handler set for weights: no zstd (it gains ~nothing on float weights and
    its buffers held about the model's size again) and no host deep copy of numpy leaves before
    the write (a second copy of the model; the writes here are synchronous and nothing touches
    the arrays meanwhile)."""
    th = ocp.type_handlers
    handlers = [(np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False))]
    # jax.Array as well, although the leaves are numpy: orbax looks its handler up for array
    # metadata and logs "No jax.Array in TypeHandlerRegistry" on every save without it
    for ty in (int, float, bytes, np.number, str, jax.Array):
        handlers.append((ty, th.get_type_handler(ty)))
    return ocp.PyTreeCheckpointHandler(
        use_compression=False, type_handler_registry=th.create_type_handler_registry(*handlers))


def write(path: str | os.PathLike, variables: Any, name: str, *, module: VGG | None = None,
          extra: dict[str, Any] | None = None) -> Path:
    """The checkpoint layout, written into ``path``, which must not exist (no atomicity:
    ``save`` adds that; the converter renames after verifying)."""
    path = Path(path).absolute()
    module = module or registry.create(name)
    meta = registry.metadata(name)
    meta.pop("categories", None)  # shipped with the package; no need to copy 1000 names
    info = {"format": FORMAT, "name": name, "overrides": module_overrides(module, name),
            "metadata": meta, **(extra or {})}
    path.mkdir(parents=True)
    arrays = jax.tree.map(np.asarray, dict(variables))
    with ocp.Checkpointer(_handler()) as ckptr:
        ckptr.save(path / "variables", args=ocp.args.PyTreeSave(arrays))
    (path / "vgg_flax.json").write_text(json.dumps(info, indent=1, default=str))
    return path


def save(path: str | os.PathLike, variables: Any, name: str, *, module: VGG | None = None,
         extra: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write ``variables`` of VGG ``name`` (built as ``module`` if given) to directory ``path``.

    The directory holds an orbax checkpoint of the variables and ``vgg_flax.json`` with the
    name, the module's non-default fields and the name's metadata, so ``load(path)`` needs
    nothing else. Written to a temporary sibling and renamed, so a crash leaves no half checkpoint.
    """
    path = Path(path).absolute()
    module = module or registry.create(name)
    mismatch = variables_mismatch(module, variables)
    if mismatch:  # load() would refuse the checkpoint: write nothing
        raise WeightMismatchError(f"the variables do not fit {name} with fields "
                                  f"{module_overrides(module, name)} ({mismatch}); pass "
                                  f"module=vgg_flax.create({name!r}, ...) with the fields they "
                                  "were made with")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (CLI: --force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp / "ckpt", variables, name, module=module, extra=extra)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp / "ckpt", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``vgg_flax.json`` of a checkpoint directory, validated: a known format, a known
    name, and overrides of the right types and ranges. Raises ``CheckpointError`` (one line)."""
    f = Path(path) / "vgg_flax.json"
    if not Path(path).is_dir():
        # load() reads files only; downloading is pretrained()'s job, never a side effect of it
        name = Path(path).name
        arg = repr(name) if name in registry.list_models() else "name"
        hint = f"published weights come from vgg_flax.pretrained({arg})"
        raise NotACheckpoint(f"{path} is not a vgg_flax checkpoint (no such directory); {hint}; "
                             "write a checkpoint with vgg_flax.save or convert/torch_to_flax.py")
    if not f.is_file():
        raise NotACheckpoint(f"{path} is not a vgg_flax checkpoint (no vgg_flax.json); "
                             "write one with vgg_flax.save or convert/torch_to_flax.py")
    try:
        info = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({str(e).splitlines()[0]}); the "
                              f"checkpoint is damaged: {_REMAKE}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{f} holds a JSON {type(info).__name__}, not an object; {_REMAKE}")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{f}: unknown format {info.get('format')!r}; this vgg_flax reads "
                              f"{FORMAT!r} (a newer vgg_flax wrote it? upgrade, or {_REMAKE})")
    name = info.get("name")
    if name is None:
        raise CheckpointError(f'{f} names no VGG (no "name"); {_REMAKE}')
    if not isinstance(name, str) or name not in registry.list_models():
        raise CheckpointError(f"{f}: unknown VGG name {name!r}; expected one of "
                              f"{', '.join(registry.list_models())}; {_REMAKE}")
    overrides = info.get("overrides", {})
    if not isinstance(overrides, dict):
        raise CheckpointError(f"{f}: 'overrides' must be an object of VGG fields, got "
                              f"{type(overrides).__name__}; {_REMAKE}")
    for k, v in overrides.items():
        if k not in saved_fields():
            raise CheckpointError(f"{f}: unknown override {k!r}; stored fields are "
                                  f"{', '.join(saved_fields())}; {_REMAKE}")
        if not FIELDS[k].check(v):  # the VGG's own rules (fields.FIELDS), on the JSON value
            raise CheckpointError(f"{f}: override {k} = {json.dumps(v)} must be "
                                  f"{FIELDS[k].allowed}; fix the file or {_REMAKE}")
    return info


def is_model_name(path: str | os.PathLike) -> bool:
    """``path`` is a VGG name with published weights (``vgg16``), not an existing directory."""
    return (isinstance(path, str) and path in registry.list_models()
            and not Path(path).exists())


def load(path: str | os.PathLike, **overrides: Any) -> tuple[VGG, dict[str, Any]]:
    """(module, variables) from a directory written by ``save``; never the network (published
    weights: ``vgg_flax.pretrained``). ``overrides`` change fields that do not change shapes
    (``taps``, ``dense``, ``dtype``...). The variables are ``jax.Array``s on the default device."""
    module, variables = read(path, **overrides)
    return module, on_device(variables, consume=True)


def read(path: str | os.PathLike, **overrides: Any) -> tuple[VGG, dict[str, Any]]:
    """``load`` of a directory with numpy leaves as orbax restores them: for readers that
    write them elsewhere (the converter, ``pretrained``'s cache) without a trip to the device."""
    path = Path(path).absolute()
    info = read_info(path)
    module = registry.create(info["name"], **{**overrides_from_json(info.get("overrides", {})), **overrides})
    if not (path / "variables").is_dir():
        raise CheckpointError(f"{path}: the variables directory is missing; the checkpoint is "
                              f"incomplete: {_REMAKE}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(path / "variables")  # numpy leaves
    except (ValueError, OSError) as e:  # tensorstore: ValueError; orbax: FileNotFoundError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{path}: cannot read the stored variables ({first}); the "
                              f"checkpoint is damaged or incomplete: {_REMAKE}") from None
    # The module must be able to use them: same tree, same shapes.
    mismatch = variables_mismatch(module, variables)
    if mismatch:
        raise CheckpointError(f"{path}: the stored variables do not fit {info['name']} with "
                              f"{info.get('overrides', {})} ({mismatch}); the checkpoint is "
                              "damaged or was edited")
    return module, variables
