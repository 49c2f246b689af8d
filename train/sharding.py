"""Meshes and parameter layouts, with the layout given as data (big_vision's rules).

A rule is ``(regex, spec)``: the first regex that matches a parameter's path (``params/fc6/kernel``)
gives its ``PartitionSpec`` as a tuple of mesh axis names (``None`` = not sharded). The defaults
replicate every convolution and split the two big FC layers over ``model`` Megatron-style: fc6
column-parallel (its 4096 outputs), fc7 row-parallel (its 4096 inputs), so fc6 -> fc7 needs one
all-reduce and no all-gather. FSDP additionally splits every large parameter (and so its optimizer
state) over ``data`` along its largest free dimension.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")

# fc6 (25088 x 4096) and fc7 (4096 x 4096) are 86% of VGG-16's parameters.
DEFAULT_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (r"(^|/)fc6/kernel$", (None, "model")),
    (r"(^|/)fc6/bias$", ("model",)),
    (r"(^|/)fc7/kernel$", ("model", None)),
    (r".*", ()),
)


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """(data, model) with -1 meaning "the rest of the devices". Raises ValueError when it does not fit."""
    if data == -1 and model == -1:
        raise ValueError("mesh.data and mesh.model cannot both be -1; set one of them")
    if model == -1:
        model = num_devices // data if data > 0 and num_devices % data == 0 else 0
    elif data == -1:
        data = num_devices // model if model > 0 and num_devices % model == 0 else 0
    if data <= 0 or model <= 0 or data * model > num_devices:
        raise ValueError(f"mesh data={data} x model={model} does not fit the {num_devices} "
                         f"available device(s); choose sizes whose product is at most {num_devices}")
    return data, model


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over the first data*model devices, process-major along ``data``
    so that every process holds whole rows of the batch."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(data, model, len(devices))
    devices = sorted(devices[: data * model], key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


def path_str(path: tuple[Any, ...]) -> str:
    """``params/fc6/kernel`` from a jax key path: the one spelling of the trainer's leaf names."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _fits(shape: tuple[int, ...], spec: Sequence[Any], mesh: Mesh) -> tuple[Any, ...]:
    """``spec`` padded to the rank, with axes that do not divide their dimension dropped (a tiny
    test model's fc6 may have fewer outputs than the model axis has devices)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, axis in zip(shape, spec[: len(shape)]):
        size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))
                         if a is not None)
        out.append(axis if axis is not None and dim % size == 0 else None)
    return tuple(out)


def _fsdp(shape: tuple[int, ...], spec: tuple[Any, ...], mesh: Mesh, min_size: int):
    """Add 'data' on the largest dimension that is not yet sharded and divides evenly."""
    n = mesh.shape["data"]
    if n == 1 or math.prod(shape) < min_size or "data" in spec:
        return spec
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if spec[i] is None and shape[i] % n == 0:
            return spec[:i] + ("data",) + spec[i + 1:]
    return spec


def param_specs(tree: Any, mesh: Mesh, rules=DEFAULT_RULES, fsdp: bool = False,
                fsdp_min_size: int = 2 ** 16) -> Any:
    """A PartitionSpec for every leaf of ``tree`` (arrays or ShapeDtypeStructs) from ``rules``."""
    compiled = [(re.compile(r), tuple(s)) for r, s in rules]

    def one(path, leaf):
        name = path_str(path)
        for regex, spec in compiled:
            if regex.search(name):
                break
        else:
            spec = ()
        spec = _fits(leaf.shape, spec, mesh)
        if fsdp:
            spec = _fsdp(leaf.shape, spec, mesh, fsdp_min_size)
        return P(*spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))
