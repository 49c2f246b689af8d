"""Per-device memory and communication of the training state and of one training step, from
XLA's analysis of the compiled programs (nothing runs); ``train/memory_report.py`` prints them."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from train import input_pipeline, sharding
from train.state import Setup
from train.steps import make_train_step
from train.validation import resolved


def state_memory(config, num_classes: int = 1000, channels: int = 3) -> dict[str, float]:
    """Per-device bytes of the training state (params + optimizer + batch_stats) as laid out by
    the config's mesh and rules, from the compiled init program's memory analysis."""
    config = resolved(config)
    data, model = sharding.mesh_shape(config.mesh.data, config.mesh.model, jax.device_count())
    mesh = sharding.make_mesh(data, model)
    setup = Setup(config, input_pipeline.DatasetInfo(num_classes, channels, 0, 0), mesh)
    compiled = setup.jit_init().lower(jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(setup.abstract))
    return {"devices": data * model, "state_bytes_total": total,
            "per_device_output_bytes": mem.output_size_in_bytes,
            "per_device_temp_bytes": mem.temp_size_in_bytes}


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per device in a compiled (SPMD) HLO module.

    Counts the result shape of every collective op (its start op for async pairs), which is what
    crosses the interconnect for all-gather/all-to-all and what is reduced for all-reduce.
    """
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u8": 1,
             "pred": 1, "s8": 1}
    out = {k: 0 for k in _COLLECTIVES}
    for line in hlo_text.splitlines():
        m = re.search(r"= (.+?) (" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
        if not m or "-done(" in line:
            continue
        for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            if dt in sizes:
                out[m.group(2)] += sizes[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return out


def _abstract_step(config, batch_size: int, num_classes: int, channels: int):
    """(the jitted training step, its abstract arguments) for the config's mesh over this
    process's devices (``--xla_force_host_platform_device_count`` fakes a pod's count on CPU)."""
    config = resolved(config)
    data, model = sharding.mesh_shape(config.mesh.data, config.mesh.model, jax.device_count())
    mesh = sharding.make_mesh(data, model)
    setup = Setup(config, input_pipeline.DatasetInfo(num_classes, channels, 0, 0), mesh)
    size = config.input.crop_size
    batch_sh = NamedSharding(mesh, P("data"))
    batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.uint8,
                                           sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh)}
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    return setup, make_train_step(setup), (setup.abstract_sharded, batch, lr)


def export_step(config, batch_size: int, platforms: tuple[str, ...], num_classes: int = 1000,
                channels: int = 3) -> jax.export.Exported:
    """The trainer's sharded training step serialized for ``platforms`` ("tpu", "cuda", ...)
    with ``jax.export``: lowering only, on any host, for a mesh of this process's devices."""
    _, step, args = _abstract_step(config, batch_size, num_classes, channels)
    return jax.export.export(step, platforms=platforms)(*args)


def custom_calls(module_text: str) -> set[str]:
    """The custom-call targets of a StableHLO/HLO module's text."""
    return set(re.findall(r"custom_call @([\w.]+)", module_text)) | set(
        re.findall(r'custom_call_target="([^"]+)"', module_text))


def cpu_only_calls(targets: set[str]) -> set[str]:
    """The targets only a CPU runtime provides: vgg_flax's oneDNN convolutions
    (``vgg_flax/onednn.py``, ``vgg_flax_conv_*``), LAPACK, XLA:CPU's oneDNN and host callbacks."""
    return {t for t in targets
            if re.match(r"(vgg_flax_|lapack_|__onednn|__xla_cpu|xla_cpu|xla_.*cpu_callback)", t)}


def step_memory(config, batch_size: int, num_classes: int = 1000,
                channels: int = 3) -> dict[str, float]:
    """Per-device memory and communication of one compiled training step (nothing runs).

    ``argument``: the sharded state and batch; ``temp``: activations, gradients and XLA's
    scratch; ``collectives``: bytes per collective kind per device per step.
    """
    setup, step, args = _abstract_step(config, batch_size, num_classes, channels)
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    return {"devices": setup.mesh.size, "argument_bytes": mem.argument_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "collectives": collective_bytes(compiled.as_text())}
