"""Every JAX API vgg_flax uses that JAX does not promise to keep, each behind a probe.

vgg_flax's oneDNN convolutions are JAX primitives of their own (``vgg_flax.onednn``): defining
one needs JAX's primitive machinery (``jax.interpreters``), a lowering rule reads the lowering
context (is this a ``jax.export``? which devices is it partitioned over?), and the primitives
must be lowered with the devices at hand. None of that is a stable API, and the most common
failure of a JAX model zoo is a JAX release that moved one such name. So each one is reached
here, and only here, through a probe that runs once per process and exercises what it checks:

    probe(name) -> ""             the API is there and behaves as vgg_flax expects
                   "why not"      one line; vgg_flax then does without it

What a failed probe costs is in ``PROBES``: the convolutions run on XLA's own kernels
(``conv="auto"`` warns once and names the probe; ``conv="onednn"`` raises a one-line error), or
the host-allocator message says less. ``import vgg_flax`` never fails on a probe.
``report()`` gives every probe's result: ``python -c "import vgg_flax.jax_internals as j;
print(j.report())"``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import jax

# name -> (what vgg_flax uses, what it does without it)
PROBES: dict[str, tuple[str, str]] = {
    "primitives": (
        "jax.extend.core.Primitive with jax.interpreters.ad / batching / mlir rules, "
        "jax.core.ShapedArray, jax.ffi and custom_partitioning: the oneDNN primitives",
        "XLA's convolutions"),
    "devices_during_lowering": (
        "jax._src.dispatch.prim_requires_devices_during_lowering: the primitives' batch "
        "partitioning needs the devices when a program is lowered",
        "XLA's convolutions"),
    "lowering_context": (
        "ctx.module_context.lowering_parameters.for_export and .axis_context in a lowering "
        "rule: a jax.export must not hold the process-local oneDNN call, and a partitioned "
        "call must know its mesh",
        "XLA's convolutions"),
    "backends_initialized": (
        "jax._src.xla_bridge.backends_are_initialized: whether JAX started its backends "
        "before import vgg_flax tuned the host allocator",
        "the allocator is tuned without telling whether it was too late"),
}
# The probes the oneDNN convolutions need, in the order they are tried.
ONEDNN = ("primitives", "devices_during_lowering", "lowering_context")


# ---- the accessors: the only places the internals are touched -------------------------------

def _import(name: str) -> Any:
    return importlib.import_module(name)


def primitive_api() -> dict[str, Any]:
    """The names ``vgg_flax.onednn`` defines its primitives with."""
    ext_core = _import("jax.extend.core")
    ad, batching, mlir = (_import(f"jax.interpreters.{m}") for m in ("ad", "batching", "mlir"))
    cp = _import("jax.experimental.custom_partitioning")
    return dict(Primitive=ext_core.Primitive, ShapedArray=jax.core.ShapedArray,
                Zero=ad.Zero, is_undefined_primal=ad.is_undefined_primal,
                primitive_jvps=ad.primitive_jvps, primitive_transposes=ad.primitive_transposes,
                primitive_batchers=batching.primitive_batchers,
                register_lowering=mlir.register_lowering, lower_fun=mlir.lower_fun,
                custom_partitioning=cp.custom_partitioning, ffi_call=jax.ffi.ffi_call,
                register_ffi_target=jax.ffi.register_ffi_target, pycapsule=jax.ffi.pycapsule,
                typeof=jax.typeof)


def devices_during_lowering() -> set:
    """The set of primitives whose lowering needs the devices (JAX's own cuDNN ones are in it)."""
    registry = _import("jax._src.dispatch").prim_requires_devices_during_lowering
    if not isinstance(registry, set):
        raise TypeError(f"prim_requires_devices_during_lowering is a {type(registry).__name__}")
    return registry


def for_export(ctx: Any) -> bool:
    """Whether the lowering that ``ctx`` belongs to is for ``jax.export`` (serialized)."""
    return bool(ctx.module_context.lowering_parameters.for_export)


def axis_context(ctx: Any) -> Any:
    """The lowering's axis context: a mesh inside shard_map, else a device count."""
    return ctx.module_context.axis_context


def backends_are_initialized() -> bool:
    """Whether JAX has started a backend (and with it XLA's worker threads)."""
    return bool(_import("jax._src.xla_bridge").backends_are_initialized())


# ---- the probes ------------------------------------------------------------------------------

def _probe_primitives() -> None:
    api = primitive_api()
    p = api["Primitive"]("vgg_flax_probe")
    p.def_abstract_eval(lambda x: api["ShapedArray"](x.shape, x.dtype))
    api["register_lowering"](p, api["lower_fun"](lambda x: x, multiple_results=False))
    out = jax.eval_shape(p.bind, jax.ShapeDtypeStruct((2,), "float32"))
    if out.shape != (2,):
        raise TypeError(f"a probe primitive's abstract eval gave {out}")


def _probe_devices_during_lowering() -> None:
    devices_during_lowering()


def _probe_lowering_context() -> None:
    api = primitive_api()
    seen: list[tuple[bool, Any]] = []
    p = api["Primitive"]("vgg_flax_context_probe")
    p.def_abstract_eval(lambda x: api["ShapedArray"](x.shape, x.dtype))
    p.def_impl(lambda x: x)

    def rule(ctx, x):
        seen.append((for_export(ctx), axis_context(ctx)))
        return [x]
    api["register_lowering"](p, rule)
    x = jax.ShapeDtypeStruct((2,), "float32")
    jax.jit(p.bind).trace(x).lower()
    jax.export.export(jax.jit(p.bind), platforms=("cpu",))(x)
    if [s[0] for s in seen] != [False, True]:
        raise TypeError(f"for_export read {[s[0] for s in seen]} for (jit, export), "
                        "not [False, True]")


def _probe_backends_initialized() -> None:
    backends_are_initialized()


_RUN: dict[str, Callable[[], None]] = {
    "primitives": _probe_primitives,
    "devices_during_lowering": _probe_devices_during_lowering,
    "lowering_context": _probe_lowering_context,
    "backends_initialized": _probe_backends_initialized,
}


@functools.cache
def probe(name: str) -> str:
    """"" when the internal API ``name`` (a key of ``PROBES``) works here, else one line why."""
    if name not in PROBES:
        raise KeyError(f"unknown probe {name!r}; probes: {', '.join(PROBES)}")
    try:
        _RUN[name]()
    except Exception as e:  # noqa: BLE001 - any failure of a private API means: do without it
        return (f"JAX {jax.__version__} changed {name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else '-'}): {PROBES[name][0].split(':')[0]}")
    return ""


@functools.cache
def onednn_blocker() -> str:
    """"" when every probe the oneDNN convolutions need passes, else the first failure."""
    for name in ONEDNN:
        why = probe(name)
        if why:
            return f"probe {name!r} failed: {why}"
    return ""


def report() -> dict[str, str]:
    """Every probe's result: "ok" or why it failed, and what vgg_flax does instead."""
    return {name: f"{probe(name)}; instead: {PROBES[name][1]}" if probe(name) else "ok"
            for name in PROBES}


def reset() -> None:
    """Forget every probe's result (for tests that make a probe fail)."""
    probe.cache_clear()
    onednn_blocker.cache_clear()
