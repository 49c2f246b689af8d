"""The model, the optimizer (with its schedule and the plateau rule) and the training state's
abstract shapes and shardings: everything fixed once the config and the data are known."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import vgg_flax
from train import input_pipeline, sharding
from train.validation import ConfigError
from vgg_flax.model import init_compiler_options


def model_overrides(config) -> dict[str, Any]:
    """The VGG fields the config sets (``model_overrides`` keys that are not None), sequences
    as tuples (train_config.json, read back on export, holds lists)."""
    def tuples(v):
        return tuple(map(tuples, v)) if isinstance(v, (list, tuple)) else v
    return {k: tuples(v) for k, v in config.model_overrides.to_dict().items() if v is not None}


def make_model(config, num_classes: int) -> vgg_flax.VGG:
    fields = {"param_dtype": "float32", **model_overrides(config)}
    fields["param_dtype"] = jnp.dtype(fields["param_dtype"])  # the config holds its name
    return vgg_flax.create(config.model, num_classes=num_classes,
                           dtype=jnp.dtype(config.compute_dtype), **fields)


def make_schedule(config):
    lr, s = config.learning_rate, config.schedule
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(s.warmup_steps, 1),
                                                  max(config.total_steps, s.warmup_steps + 1))
    if s.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, s.warmup_steps),
                                     optax.constant_schedule(lr)], [s.warmup_steps])
    return optax.constant_schedule(lr)


def make_optimizer(config):
    """(tx, schedule). The plateau factor (lr / 10 when validation accuracy stalls) is applied
    outside ``tx`` as ``lr_scale`` because it is driven by evaluation, not by the update."""
    o = config.optimizer
    schedule = make_schedule(config)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # kernels only
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.name == "sgd":
        # torch/Caffe SGD: g + wd * w, then momentum, then the learning rate.
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay, decay_mask))
        parts.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    else:
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def make_plateau(config):
    s = config.schedule
    return optax.contrib.reduce_on_plateau(factor=s.plateau_factor, patience=s.plateau_patience,
                                           cooldown=s.plateau_cooldown, rtol=s.plateau_rtol)


def plateau_to_json(state) -> dict[str, float]:
    return {k: float(v) for k, v in state._asdict().items()}


def plateau_from_json(template, d: dict[str, float]):
    return type(template)(**{k: jnp.asarray(d[k], jnp.asarray(getattr(template, k)).dtype)
                             for k in template._fields})


class Setup:
    """Everything about a run that is fixed once the config and the data are known."""

    def __init__(self, config, info: input_pipeline.DatasetInfo, mesh):
        self.config, self.info, self.mesh = config, info, mesh
        self.model = make_model(config, info.num_classes)
        self.tx, self.schedule = make_optimizer(config)
        size = config.input.crop_size
        if size < self.model.min_input_size():
            raise ConfigError(f"input.crop_size {size} is below {config.model}'s minimum input "
                              f"{self.model.min_input_size()}; raise it or set model_overrides")
        self.input_shape = (1, size, size, info.channels)
        self.abstract = jax.eval_shape(self.init, jax.random.key(0))
        rules = [(r, tuple(s)) for r, s in config.sharding.rules]
        pspecs = sharding.param_specs(self.abstract["params"], mesh, rules,
                                      config.sharding.fsdp, config.sharding.fsdp_min_size)
        param_sh = sharding.named(mesh, pspecs)
        replicated = NamedSharding(mesh, P())
        opt_sh = optax.tree_map_params(
            self.tx, lambda _, s: s, self.abstract["opt_state"], param_sh,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding))
        self.shardings = {"step": replicated, "params": param_sh,
                          "batch_stats": jax.tree.map(lambda _: replicated,
                                                      self.abstract["batch_stats"]),
                          "opt_state": opt_sh}
        self.abstract_sharded = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract, self.shardings)

    def init(self, rng) -> dict[str, Any]:
        x = jnp.zeros(self.input_shape, jnp.float32)
        variables = self.model.init({"params": rng}, x, train=False)
        params = variables["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "batch_stats": variables.get("batch_stats", {}),
                "opt_state": self.tx.init(params)}

    def jit_init(self):
        """``init`` jitted as the trainer runs it: laid out by the mesh's shardings, compiled with
        ``init_compiler_options()`` (the same bits in less compile time on CPU)."""
        return jax.jit(self.init, out_shardings=self.shardings,
                       compiler_options=init_compiler_options())
