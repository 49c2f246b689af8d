"""The three Flax outputs: orbax (``vgg_flax.load``'s checkpoint directory), safetensors (the
``safetensors`` library, with vgg_flax's name and fields as metadata) and flax msgpack
(``flax.serialization``); reading them back; and a bit-for-bit check of what was written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vgg_flax import checkpoint, torch_io
from vgg_flax.errors import ConversionError, WeightFileError
from vgg_flax.convert.memory import release_memory
from vgg_flax.convert.sources import build_module, check_name

FORMATS = ("orbax", "safetensors", "msgpack")


def flatten(variables: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """[("params/conv1_1/kernel", array), ...]: safetensors' flat names for a variables tree."""
    out = []
    for k, v in variables.items():
        if isinstance(v, Mapping):
            out += flatten(v, f"{prefix}{k}/")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _format_of_suffix(out: Path | None) -> str:
    if out is not None and out.suffix == ".safetensors":
        return "safetensors"
    if out is not None and out.suffix in (".msgpack", ".flax"):
        return "msgpack"
    return "orbax"


def format_for(out: Path | None, fmt: str | None) -> str:
    """The output format: ``fmt``, which must agree with ``out``'s suffix (readers, ours
    included, pick the format by it), or the one the suffix names (none: orbax)."""
    if fmt is None:
        return _format_of_suffix(out)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out is not None and _format_of_suffix(out) != fmt:
        want = {"orbax": "a directory name (no .safetensors/.msgpack suffix)",
                "safetensors": "a .safetensors file name", "msgpack": "a .msgpack file name"}
        raise ConversionError(f"--format {fmt} does not match --out {out}: {fmt} output needs "
                              f"{want[fmt]}; change --out, or drop --format (--out's suffix "
                              "picks the format)")
    return fmt


def default_out(name: str, fmt: str) -> Path:
    return Path("out") / (name + {"orbax": "", "safetensors": ".safetensors",
                                  "msgpack": ".msgpack"}[fmt])


def write_flax(path: Path, variables: Mapping[str, Any], name: str, module, fmt: str,
               extra: Mapping[str, Any] | None = None) -> None:
    """Write ``variables`` at ``path`` (which must not exist) in ``fmt``.

    safetensors writes straight from the arrays' memory; msgpack is built whole in memory by
    ``flax.serialization`` first (one more copy of the weights while it is written).
    """
    if fmt == "orbax":
        checkpoint.write(path, variables, name, module=module, extra=extra)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file
        meta = {"format": checkpoint.FORMAT, "name": name,
                "overrides": json.dumps(checkpoint.module_overrides(module, name))}
        save_file({k: np.ascontiguousarray(a) for k, a in flatten(variables)}, path, meta)
    else:
        from flax import serialization
        path.write_bytes(serialization.msgpack_serialize(dict(variables), in_place=True))


def read_flax(path: Path, name: str | None = None, overrides: Mapping[str, Any] | None = None):
    """(name, module, variables) from an orbax dir, our .safetensors, or a flax .msgpack (which
    carries no name: pass ``name`` and shape ``overrides``)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"no such checkpoint: {path}; pass a directory written by "
                              "convert/torch_to_flax.py or vgg_flax.save")
    if path.is_dir():
        return _read_orbax(path)
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty; re-create it with convert/torch_to_flax.py")
    if path.suffix == ".safetensors":
        try:
            _, meta, _ = torch_io.read_safetensors_header(path)
        except WeightFileError as err:
            raise ConversionError(str(err)) from None
        if "name" not in meta:
            raise ConversionError(f"{path} has no vgg_flax metadata (name); write it with "
                                  "convert/torch_to_flax.py --format safetensors")
        check_name(meta["name"])
        try:
            fields = checkpoint.overrides_from_json(json.loads(meta.get("overrides", "{}")))
        except (json.JSONDecodeError, AttributeError, TypeError) as err:
            raise ConversionError(f"{path}: its vgg_flax metadata is corrupt ({err}); re-create "
                                  "it with convert/torch_to_flax.py") from None
        module, _ = build_module(meta["name"], None, fields)
        from safetensors.numpy import load_file
        return meta["name"], module, unflatten(load_file(path))
    import msgpack
    from flax import serialization
    if name is None:
        raise ConversionError(f"{path} (flax msgpack) does not say which VGG it holds; pass --name")
    module, _ = build_module(name, None, overrides)
    try:
        variables = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError, msgpack.UnpackException) as err:  # what corrupt input raises
        raise ConversionError(f"{path} is not a readable flax msgpack file "
                              f"({torch_io.short_error(err)})") from None
    return name, module, variables


def _read_orbax(path: Path):
    """A checkpoint directory, every problem one line: no or unreadable ``vgg_flax.json``, an
    unknown name, missing or damaged array files."""
    try:
        info = checkpoint.read_info(path)
    except (FileNotFoundError, ValueError) as err:  # no file, or JSON that does not parse
        raise ConversionError(str(err)) from None
    if not isinstance(info.get("name"), str):
        raise ConversionError(f"{path}/vgg_flax.json names no VGG (no \"name\"); re-create the "
                              "checkpoint with convert/torch_to_flax.py or vgg_flax.save")
    check_name(info["name"])
    overrides = info.get("overrides")
    if not isinstance(overrides, dict):
        raise ConversionError(f"{path}/vgg_flax.json has no \"overrides\" object; the "
                              "checkpoint is damaged: re-create it")
    build_module(info["name"], None, checkpoint.overrides_from_json(overrides))  # fields' errors
    try:
        module, variables = checkpoint.read(path)  # numpy: they are written out again
    except (OSError, RuntimeError, ValueError) as err:  # tensorstore: missing or damaged files
        raise ConversionError(f"{path}: cannot read its arrays ({torch_io.short_error(err)}); "
                              "the checkpoint is damaged: re-create it") from None
    return info["name"], module, variables


def digests(variables: Mapping[str, Any]) -> dict[str, str]:
    """blake2b of every leaf's bytes (and dtype, shape): to check a written file bit for bit."""
    out = {}
    for k, a in flatten(variables):
        a = np.ascontiguousarray(np.asarray(a))
        h = hashlib.blake2b(f"{a.dtype.name}{a.shape}".encode(), digest_size=16)
        h.update(memoryview(a).cast("B"))
        out[k] = h.hexdigest()
    return out


def shapes(variables) -> dict[str, str]:
    return {k: f"{np.dtype(a.dtype).name}{tuple(a.shape)}" for k, a in flatten(variables)}


def check_written(path: Path, fmt: str, name: str, fields: Mapping[str, Any],
                  expected: Mapping[str, str]) -> None:
    """The written file holds what was converted: safetensors/msgpack are read back and compared
    bit for bit (``digests``); for orbax (its own, tested writer; restoring would cost twice the
    model in memory) the checkpoint's metadata must list the same arrays, shapes and dtypes and
    ``vgg_flax.json`` the same name."""
    if fmt == "orbax":
        import orbax.checkpoint as ocp
        info = checkpoint.read_info(path)
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(Path(path).absolute() / "variables")  # orbax wants absolute paths
        tree = getattr(meta, "item_metadata", meta)
        tree = tree.tree if hasattr(tree, "tree") else tree
        got = {k: f"{np.dtype(m.dtype).name}{tuple(m.shape)}" for k, m in flatten(dict(tree))}
        ok = info.get("name") == name and got == dict(expected)
    else:
        got = digests(read_flax(path, name, fields)[2])
        release_memory()
        ok = got == dict(expected)
    if not ok:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ConversionError(f"internal error: the {fmt} output differs from the converted arrays "
                              f"at {', '.join(bad[:4]) or 'its name'}; nothing written")
