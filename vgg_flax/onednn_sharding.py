"""How oneDNN's convolutions are sharded: each FFI custom call of ``vgg_flax.onednn`` as a
``custom_partitioning`` op whose batch dimension partitions (data parallel, FSDP) while every other
dimension is gathered; a weight gradient is summed over the batch shards (an all-reduce) inside
the partitioned program, as XLA does for its own convolutions."""
from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P


def ffi(target, out, operands, geom, **attrs):
    strides, padding, dilation = geom
    return jax.ffi.ffi_call(target, out)(
        *operands, strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in padding for p in pair], np.int64),
        dilation=np.asarray(dilation, np.int64), **attrs)


def _batch_axes(sharding):
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _axis_names(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def partitioned(custom_partitioning, target: str, rule: str, out, geom, *,
                weight_gradient: bool = False, **attrs):
    """The custom call ``target`` as a function of its operands, for one geometry, wrapped in
    ``custom_partitioning`` (JAX's, as ``vgg_flax.jax_internals`` finds it).

    ``rule`` names each dimension (Shardy's notation); ``n`` is the batch. Sharded, every device
    runs the call on its slice of the batch with the kernel (and bias) whole. A weight gradient
    has no batch dimension: each device sums over its own slice, then the slices' sums are added
    across the batch axes (an all-reduce).
    """
    n_operands = rule.split("->")[0].count(",") + 1
    factors = rule.replace(",", " ").replace("->", " ").split()

    def call(*operands):  # on global shapes, and on each device's slice when partitioned
        local = out if weight_gradient else jax.ShapeDtypeStruct(
            (operands[0].shape[0], *out.shape[1:]), out.dtype)
        return ffi(target, local, operands, geom, **attrs)

    op = custom_partitioning(call)

    def shardings(mesh, arg_shapes):
        axes = _batch_axes(arg_shapes[0].sharding)
        return axes, NamedSharding(mesh, P(axes, None, None, None)), NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        axes, batch, replicated = shardings(mesh, arg_shapes)
        if weight_gradient:  # (x, dy) -> dw[, db], summed over the batch shards
            names = _axis_names(axes)

            def lower(*operands):
                grads = call(*operands)
                return jax.tree.map(lambda g: lax.psum(g, names), grads) if names else grads
            return (mesh, lower, jax.tree.map(lambda _: replicated, out), (batch,) * n_operands)
        # (x or dy, w[, b]): the batch stays split, the kernel and bias are whole everywhere
        return mesh, call, batch, (batch,) + (replicated,) * (n_operands - 1)

    def infer(mesh, arg_shapes, result_shape):
        _, batch, replicated = shardings(mesh, arg_shapes)
        return jax.tree.map(lambda _: replicated, out) if weight_gradient else batch

    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     propagate_user_sharding=None, sharding_rule=rule,
                     **({"reduction_factors": ("n",)} if weight_gradient else {}),
                     need_replication_factors=tuple(dict.fromkeys(f for f in factors
                                                                  if f != "n")))
    return op
