"""Step time of fine-tuning the native NNX VGG against the Linen one, in one process, interleaved.

    python benchmarks/nnx_step.py                         # vgg16 at 224x224, batch 8 (s/step)
    python benchmarks/nnx_step.py --small --reps 30       # a tiny vgg11_bn at 32x32: seconds

Every row runs the same training step (training mode, softmax cross-entropy, optax SGD with
momentum 0.9, dropout on) on the same batch, from the same weights, with its state donated as
every JAX training loop does:

- ``linen jax.jit``: the Linen module, ``(params, batch_stats, opt_state)`` through a plain
  ``jax.jit``;
- ``nnx nnx.jit``: ``nnx.Optimizer`` and the NNX model under ``nnx.jit``, which traverses the
  module graph in Python on every call;
- ``nnx split/merge + jax.jit``: the same NNX step, with the graph split once outside and the
  state passed through a plain ``jax.jit`` (Flax's documented fast path).

After a warm-up (compile) each round times one step of every row in turn, so drift in machine
load hits all alike; prints the median seconds per step and its ratio to the Linen row.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import vgg_flax
import vgg_flax.nnx as vn

SMALL = dict(width=0.125, hidden_size=32, pool_size=(1, 1), num_classes=10)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linen_row(module, variables, tx, x, y):
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
             "opt": tx.init(variables["params"]), "key": jax.random.key(1)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        key, drop = jax.random.split(state["key"])

        def loss_fn(params):
            logits, updates = module.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                mutable=["batch_stats"], rngs={"dropout": drop})
            return _loss(logits, y), updates.get("batch_stats", {})
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt": opt, "key": key}, loss

    def run():
        nonlocal state
        state, loss = step(state, x, y)
        return loss
    return run


def nnx_row(model, tx, x, y):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), y))(model)
        optimizer.update(model, grads)
        return loss
    return lambda: step(model, optimizer, x, y)


def split_merge_row(model, tx, x, y):
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), y))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def run():
        nonlocal state
        state, loss = step(state, x, y)
        return loss
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16", choices=vgg_flax.list_models())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None,
                   help="input height and width (default 224, 32 with --small)")
    p.add_argument("--reps", type=int, default=10, help="timed rounds")
    p.add_argument("--small", action="store_true",
                   help=f"a tiny model ({', '.join(f'{k}={v}' for k, v in SMALL.items())})")
    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be at least 1")
    size = args.size or (32 if args.small else 224)
    fields = dict(SMALL) if args.small else {}
    if vgg_flax.metadata(args.model)["head"] != "fc":
        p.error(f"--model {args.model} has no classifier to fine-tune; pick a classification VGG")

    model = vn.create(args.model, rngs=nnx.Rngs(0), **fields)
    model.train()
    module, variables = vn.to_linen(model)
    variables = jax.tree.map(jnp.copy, variables)  # the Linen row donates its own copy
    x = jax.random.normal(jax.random.key(2), (args.batch, size, size, 3))
    y = jax.random.randint(jax.random.key(3), (args.batch,), 0, module.num_classes)
    tx = optax.sgd(0.01, momentum=0.9)
    rows = {
        "linen jax.jit": linen_row(module, variables, tx, x, y),
        "nnx nnx.jit": nnx_row(model, tx, x, y),
        "nnx split/merge + jax.jit": split_merge_row(
            vn.to_nnx(module, jax.tree.map(jnp.copy, variables)), tx, x, y),
    }
    for name, run in rows.items():  # compile, then one more step off the clock
        t = time.perf_counter()
        jax.block_until_ready(run())
        print(f"{name:<28} first step (trace + compile + run) {time.perf_counter() - t:8.2f} s",
              flush=True)
        jax.block_until_ready(run())
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.reps):
        for name, run in rows.items():
            t = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["linen jax.jit"])
    print(f"\n{args.model}{' (small)' if args.small else ''}, batch {args.batch}, {size}x{size}, "
          f"{args.reps} interleaved rounds, jax {jax.__version__}")
    print(f"{'step':<28} {'median s/step':>14} {'vs linen':>9}")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:<28} {median:14.5f} {median / base:8.3f}x")


if __name__ == "__main__":
    main()
