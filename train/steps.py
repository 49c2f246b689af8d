"""The jitted training and evaluation steps, and the evaluation loop over a dataset.

The train step takes the state donated, the global batch sharded over ``data`` and the plateau
rule's ``lr_scale``; gradient accumulation scans micro-batches that stay on their devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from train.state import Setup
from vgg_flax.evaluate import topk_hits


def _normalise(config, images, dtype):
    from vgg_flax.images import normalize_lookup  # bit-equal to train/eval.py's input
    return normalize_lookup(images, config.input.mean, config.input.std, xp=jnp).astype(dtype)


def _correct(logits, labels, k: int):
    return topk_hits(logits, labels, k, xp=jnp).astype(jnp.float32)


def make_train_step(setup: Setup):
    config, model, tx, schedule = setup.config, setup.model, setup.tx, setup.schedule
    accum, classes, ls = config.grad_accum_steps, setup.info.num_classes, config.label_smoothing
    dropout_root = jax.random.fold_in(jax.random.key(config.seed), 1)
    batch_sh = NamedSharding(setup.mesh, P("data"))

    def loss_fn(params, batch_stats, x, y, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, mutated = model.apply(variables, x, train=True, rngs={"dropout": rng},
                                      mutable=["batch_stats"])
        logits = logits.astype(jnp.float32)
        target = jax.nn.one_hot(y, classes)
        if ls:
            target = optax.smooth_labels(target, ls)
        loss = optax.softmax_cross_entropy(logits, target).mean()
        return loss, (mutated.get("batch_stats", {}), logits)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state, batch, lr_scale):
        x = _normalise(config, batch["image"], model.dtype)
        y = batch["label"]
        rng = jax.random.fold_in(dropout_root, state["step"])
        params = state["params"]
        if accum == 1:
            (loss, (batch_stats, logits)), grads = grad_fn(params, state["batch_stats"], x, y, rng)
            top1, top5 = _correct(logits, y, 1).mean(), _correct(logits, y, 5).mean()
        else:
            # Micro-batch i takes rows i, i+A, i+2A...: every device keeps its own rows, so
            # splitting the batch moves no data between devices.
            def split(a):
                a = a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    a, NamedSharding(setup.mesh, P(None, "data")))

            def body(carry, inp):
                gsum, bs, lsum, c1, c5 = carry
                xi, yi, i = inp
                (l, (bs, logits)), g = grad_fn(params, bs, xi, yi, jax.random.fold_in(rng, i))
                gsum = jax.tree.map(jnp.add, gsum, g)
                return (gsum, bs, lsum + l, c1 + _correct(logits, yi, 1).mean(),
                        c5 + _correct(logits, yi, 5).mean()), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, state["batch_stats"], 0.0, 0.0, 0.0)
            (gsum, batch_stats, lsum, c1, c5), _ = jax.lax.scan(
                body, init, (split(x), split(y), jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, gsum)
            loss, top1, top5 = lsum / accum, c1 / accum, c5 / accum
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
        params = optax.apply_updates(params, updates)
        gnorm, pnorm = optax.tree.norm(grads), optax.tree.norm(params)
        metrics = {"loss": loss, "top1": top1, "top5": top5, "grad_norm": gnorm,
                   "lr": schedule(state["step"]) * lr_scale,
                   "param_norm": pnorm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(pnorm)}
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                     "opt_state": opt_state}
        return new_state, metrics

    replicated = NamedSharding(setup.mesh, P())
    return jax.jit(step_fn, in_shardings=(setup.shardings, batch_sh, replicated),
                   out_shardings=(setup.shardings, replicated), donate_argnums=0)


def make_eval_step(setup: Setup):
    config, model = setup.config, setup.model

    def eval_fn(state, batch):
        variables = {"params": state["params"]}
        if state["batch_stats"]:
            variables["batch_stats"] = state["batch_stats"]
        x = _normalise(config, batch["image"], model.dtype)
        logits = model.apply(variables, x, train=False).astype(jnp.float32)
        y, mask = batch["label"], batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return {"count": mask.sum(), "loss": (loss * mask).sum(),
                "top1": (_correct(logits, y, 1) * mask).sum(),
                "top5": (_correct(logits, y, 5) * mask).sum()}

    shard = {k: v for k, v in setup.shardings.items() if k in ("params", "batch_stats", "step")}
    return jax.jit(lambda s, b: eval_fn(s, b),
                   in_shardings=(shard, NamedSharding(setup.mesh, P("data"))),
                   out_shardings=NamedSharding(setup.mesh, P()))


def global_batch(setup: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, sharded over ``data``."""
    sh = NamedSharding(setup.mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


def evaluate(setup: Setup, eval_step, state, eval_ds) -> dict[str, float]:
    sub = {"params": state["params"], "batch_stats": state["batch_stats"], "step": state["step"]}
    totals = None
    for local in eval_ds:
        out = eval_step(sub, global_batch(setup, local))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    return {"eval_loss": float(totals["loss"]) / n, "eval_top1": float(totals["top1"]) / n,
            "eval_top5": float(totals["top5"]) / n, "eval_examples": int(totals["count"])}
