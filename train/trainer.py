"""The training loop as importable functions, in big_vision's order:

    config -> checks -> mesh -> data -> model -> abstract init (jax.eval_shape) -> shardings from
    rules -> jax.jit(init, out_shardings) -> restore or warm start -> jitted update with the state
    donated -> loop (progress bar, metrics, periodic evaluation, checkpoints) -> plot

One program for one CPU and for a pod: everything is ``jax.jit`` over a ('data', 'model') mesh
with NamedSharding; each process feeds only its rows of the global batch.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import vgg_flax
from train import input_pipeline, sharding

log = logging.getLogger("vgg_flax.train")

REQUIRED_KEYS = ("model", "dataset", "batch_size", "total_steps", "checkpoint_every_steps",
                 "eval_every_steps", "seed", "mesh.data", "mesh.model")
# The paper (section 3.1): a deeper net starts from net A's first four conv layers and its FCs.
PAPER_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
CONFIG_FILE = "train_config.json"


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients, or the parameters) stopped being finite."""


# -- configuration ----------------------------------------------------------------------------
def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (``train/configs/NAME.py``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see train/configs/")
    spec = importlib.util.spec_from_file_location(f"_vgg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config, num_devices: int | None = None, process_count: int | None = None):
    """Every check that needs no data and no compilation. Returns the (data, model) mesh shape;
    raises ConfigError with one line otherwise."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    for key in REQUIRED_KEYS:
        try:
            _get(config, key)
        except (KeyError, AttributeError):
            raise ConfigError(f"config has no {key!r}; every config needs "
                              f"{', '.join(REQUIRED_KEYS)} (start from train/configs/base.py)")
    if config.model not in vgg_flax.list_models():
        raise ConfigError(f"unknown model {config.model!r}; choose one of: "
                          f"{', '.join(vgg_flax.list_models())}")
    if vgg_flax.create(config.model).head != "fc":
        raise ConfigError(f"{config.model} has no classifier head; train a classification VGG")
    try:
        vgg_flax.create(config.model, **config.model_overrides.to_dict())
    except TypeError as e:
        raise ConfigError(f"config.model_overrides: {e}") from None
    _check_dataset_name(config.dataset)
    try:
        data, model = sharding.mesh_shape(config.mesh.data, config.mesh.model, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("batch_size", "total_steps", "checkpoint_every_steps", "eval_every_steps",
                "grad_accum_steps"):
        if int(config[key]) <= 0:
            raise ConfigError(f"{key} must be positive, got {config[key]}")
    bs, accum = config.batch_size, config.grad_accum_steps
    if bs % (data * accum):
        raise ConfigError(f"batch_size {bs} is not divisible by mesh.data={data} x "
                          f"grad_accum_steps={accum}; use a multiple of {data * accum}")
    ebs = config.eval_batch_size or bs
    if ebs % data or ebs % process_count:
        raise ConfigError(f"eval_batch_size {ebs} is not divisible by mesh.data={data} and "
                          f"the {process_count} processes")
    if process_count > 1 and (data * model != num_devices or data % process_count):
        raise ConfigError(f"with {process_count} processes the mesh must use all {num_devices} "
                          f"devices and mesh.data ({data}) must be a multiple of the process count")
    if bs % process_count:
        raise ConfigError(f"batch_size {bs} is not divisible by the {process_count} processes")
    if config.schedule.name not in ("constant", "cosine", "plateau"):
        raise ConfigError(f"unknown schedule.name {config.schedule.name!r}; use constant, "
                          "cosine or plateau")
    if config.optimizer.name not in ("sgd", "adamw"):
        raise ConfigError(f"unknown optimizer.name {config.optimizer.name!r}; use sgd or adamw")
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown compute_dtype {config.compute_dtype!r}; use float32 or bfloat16")
    if config.input.train_kind not in ("scale_jitter", "random_resized_crop"):
        raise ConfigError(f"unknown input.train_kind {config.input.train_kind!r}; use "
                          "scale_jitter or random_resized_crop")
    if config.input.train_kind == "scale_jitter" and not (
            config.input.crop_size <= config.input.scale_min <= config.input.scale_max):
        raise ConfigError("scale jittering needs crop_size <= scale_min <= scale_max, got "
                          f"{config.input.crop_size}, {config.input.scale_min}, {config.input.scale_max}")
    if config.get("manual_dir") and not os.path.isdir(config.manual_dir):
        raise ConfigError(f"manual_dir {config.manual_dir} does not exist; point "
                          "--config.manual_dir at the directory holding the dataset's archives")
    if config.get("init_from") and not (Path(config.init_from) / "vgg_flax.json").is_file():
        raise ConfigError(f"init_from {config.init_from} is not a vgg_flax checkpoint; export one "
                          "with train/export.py or convert/torch_to_flax.py")
    return data, model


def _check_dataset_name(name: str) -> None:
    if name in input_pipeline.IN_MEMORY:
        return
    import tensorflow_datasets as tfds
    try:
        tfds.builder_cls(name.split(":")[0].split("/")[0])
    except Exception:
        raise ConfigError(f"unknown dataset {name!r}: use 'digits' or a TFDS dataset name "
                          "(tfds.list_builders())") from None


def resolved(config) -> ml_collections.ConfigDict:
    """A copy with derived defaults filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    with config.unlocked():
        if not config.get("eval_batch_size"):
            config.eval_batch_size = config.batch_size
    return config


# -- model, optimizer, state ------------------------------------------------------------------
def make_model(config, num_classes: int) -> vgg_flax.VGG:
    return vgg_flax.create(config.model, num_classes=num_classes,
                           dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32,
                           **config.model_overrides.to_dict())


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


# -- steps ------------------------------------------------------------------------------------
def _normalise(config, images, dtype):
    from vgg_flax.preprocess import normalize_lookup  # bit-equal to train/eval.py's input
    return normalize_lookup(images, config.input.mean, config.input.std, xp=jnp).astype(dtype)


def _correct(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return (top == labels[:, None]).any(axis=-1).astype(jnp.float32)


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


# -- warm start -------------------------------------------------------------------------------
def _flat(tree) -> dict[str, Any]:
    return {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def warm_start(variables: dict[str, Any], path: str, layers: str = "") -> tuple[dict, list[str]]:
    """``variables`` (params, batch_stats) with layers copied from the vgg_flax checkpoint at
    ``path``. Returns (new variables, notes). See base.py's ``init_from_layers``."""
    _, src = vgg_flax.load(path)
    src_flat = _flat({k: v for k, v in src.items() if k in ("params", "batch_stats")})
    chosen = (PAPER_INIT_LAYERS if layers == "paper"
              else tuple(x.strip() for x in layers.split(",") if x.strip()) if layers else None)
    notes, errors, copied = [], [], set()

    def one(p, leaf):
        name = sharding.path_str(p)
        layer = name.split("/")[1]
        if chosen is not None and layer not in chosen:
            return leaf
        if name not in src_flat:
            errors.append(f"{name} missing")
            return leaf
        value = np.asarray(src_flat[name])
        if value.shape != leaf.shape:
            if chosen is None and layer == "fc8":  # fine-tuning to a new label set
                notes.append(f"fc8 re-initialised ({value.shape} in {path}, {leaf.shape} here)")
                return leaf
            errors.append(f"{name} has shape {value.shape}, expected {leaf.shape}")
            return leaf
        copied.add(layer)
        return value.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(one, variables)
    if chosen is not None:
        errors += [f"layer {c} not in this model" for c in chosen
                   if c not in {n.split("/")[1] for n in _flat(variables)}]
    if errors:
        raise ConfigError(f"init_from {path} does not fit {len(errors)} parameter(s): "
                          f"{'; '.join(errors[:6])}; pick layers with --config.init_from_layers")
    notes.insert(0, f"warm start from {path}: {len(copied)} layers copied")
    return out, notes


# -- checkpoints ------------------------------------------------------------------------------
@functools.cache
def _configure_array_saving() -> None:
    """Replica-parallel saving (each replica writes a slice of a replicated array) compiles a
    slicing program per array shape; worth it for fc6's 400 MB, not for a 64-element bias."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=True,
                                                  min_slice_bytes_for_replica_parallel=2 ** 24),
        override=True)


def checkpoint_manager(workdir: Path, config, read_only: bool = False) -> ocp.CheckpointManager:
    _configure_array_saving()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=not read_only, read_only=read_only,
        enable_async_checkpointing=config.async_checkpointing, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def restore_latest(mngr, workdir: Path, abstract_state, train_iter=None):
    """(step, state, meta) from the newest readable checkpoint, or (None, None, None).

    A checkpoint that fails to restore is moved to ``DIR/corrupt_checkpoints`` with a warning and
    the previous one is tried, so a half-written or damaged latest step never blocks a resume.
    """
    bad = []
    result = (None, None, None)
    for step in sorted(mngr.all_steps(), reverse=True):
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if train_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(train_iter)
        try:
            r = mngr.restore(step, args=ocp.args.Composite(**items))
            result = (step, r["state"], r["meta"])
            break
        except Exception as e:  # any damage: missing files, bad bytes, wrong structure
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to the "
                        "previous one", step, mngr.directory, type(e).__name__, msg)
            bad.append(step)
    if bad and train_iter is not None:
        if jax.process_index() == 0:
            dest = workdir / "corrupt_checkpoints"
            dest.mkdir(exist_ok=True)
            for step in bad:
                target = dest / f"{step}-{int(time.time())}"
                shutil.move(str(Path(mngr.directory) / str(step)), target)
                log.warning("moved unreadable checkpoint %d to %s", step, target)
        multihost_utils.sync_global_devices("vgg_flax_quarantine")
        mngr.reload()
    return result


# -- metrics ----------------------------------------------------------------------------------
class MetricWriter:
    """metrics.jsonl + TensorBoard events in DIR; a no-op on processes other than 0."""

    def __init__(self, workdir: Path, active: bool, resume_step: int):
        self.active, self.path = active, workdir / "metrics.jsonl"
        self.tb = None
        if not active:
            return
        if self.path.exists():  # drop lines from after the checkpoint we resume from
            keep = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            os.replace(tmp, self.path)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, int(step))
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(workdir: Path) -> Path | None:
    """DIR/curves.png: training loss, train and eval top-1/top-5, learning rate."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    series = lambda key: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(*series("loss"), label="train")
    axes[0].plot(*series("eval_loss"), "o-", label="eval")
    axes[0].set(title="loss", xlabel="step", yscale="log")
    for key, style in (("top1", "-"), ("eval_top1", "o-"), ("eval_top5", "s--")):
        axes[1].plot(*series(key), style, label=key)
    axes[1].set(title="accuracy", xlabel="step", ylim=(0, 1))
    axes[2].plot(*series("lr"))
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    out, tmp = workdir / "curves.png", workdir / ".curves.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# -- the run ----------------------------------------------------------------------------------
class _StopFlag:
    """SIGTERM (preemption) -> finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())


def prepare(config, workdir):
    """Checks, mesh, data and shapes: everything before compilation (errors are ConfigError)."""
    config = resolved(config)
    data, model = validate(config)
    mesh = sharding.make_mesh(data, model)
    try:
        train_src = input_pipeline.get_source(config, config.train_split)
        eval_src = input_pipeline.get_source(config, config.eval_split)
        info = input_pipeline.dataset_info(config, train_src, eval_src)
    except input_pipeline.DataError as e:
        raise ConfigError(str(e)) from None
    setup = Setup(config, info, mesh)
    return setup, train_src, eval_src


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (resuming from DIR/checkpoints when there is one) and evaluate. Returns the final
    metrics and ``status`` ("done" or "preempted"); raises TrainingDiverged on NaN/inf."""
    from tqdm import tqdm
    t_start = time.time()
    workdir = Path(workdir).absolute()
    setup, train_src, eval_src = prepare(config, workdir)
    config, mesh = setup.config, setup.mesh
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        info = {"config": config.to_dict(), "dataset_info": vars(setup.info)}
        tmp = workdir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=1, default=list))
        os.replace(tmp, workdir / CONFIG_FILE)
    multihost_utils.sync_global_devices("vgg_flax_workdir")

    train_ds = input_pipeline.train_dataset(config, train_src, pi, pc)
    eval_ds = input_pipeline.eval_dataset(config, eval_src, pi, pc)
    train_iter = iter(train_ds)

    mngr = checkpoint_manager(workdir, config)
    plateau = make_plateau(config)
    plateau_state = plateau.init({})
    step, state, meta = restore_latest(mngr, workdir, setup.abstract_sharded, train_iter)
    if state is None:
        init = jax.jit(setup.init, out_shardings=setup.shardings)
        state = init(jax.random.key(config.seed))
        step = 0
        if config.get("init_from"):
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            variables, notes = warm_start(jax.device_get(variables), config.init_from,
                                          config.init_from_layers)
            for n in notes:
                log.info(n)
            state.update(jax.device_put(variables, {"params": setup.shardings["params"],
                                                    "batch_stats": setup.shardings["batch_stats"]}))
    else:
        plateau_state = plateau_from_json(plateau_state, meta["plateau"])
        log.info("resumed from %s at step %d", mngr.directory, step)
    lr_scale = float(plateau_state.scale) if config.schedule.name == "plateau" else 1.0

    train_step, eval_step = make_train_step(setup), make_eval_step(setup)
    writer = MetricWriter(workdir, primary, step)
    images_per_step = config.batch_size
    final: dict[str, Any] = {"status": "done"}
    window: list[dict[str, float]] = []
    bar = tqdm(total=config.total_steps, initial=step, disable=not primary, unit="step",
               dynamic_ncols=True, desc="train")
    t_window, last_eval = time.time(), None

    def save(at: int):
        meta = {"step": at, "plateau": plateau_to_json(plateau_state)}
        mngr.save(at, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(train_iter)), force=True)

    try:
        with _StopFlag() as stop:
            while step < config.total_steps:
                if stop.agreed():
                    if mngr.latest_step() != step:  # not already saved by the loop
                        save(step)
                    mngr.wait_until_finished()
                    final["status"] = "preempted"
                    log.warning("SIGTERM: checkpoint saved at step %d in %s; rerun the same "
                                "command to resume", step, mngr.directory)
                    break
                batch = global_batch(setup, next(train_iter))
                state, metrics = train_step(state, batch, jnp.float32(lr_scale))
                metrics = jax.device_get(metrics)
                if not metrics["finite"]:
                    mngr.wait_until_finished()
                    good = mngr.latest_step()
                    raise TrainingDiverged(
                        f"loss {float(metrics['loss'])} / gradient norm "
                        f"{float(metrics['grad_norm'])} not finite at step {step + 1}: stopped; "
                        f"the last good checkpoint is step {good} in {mngr.directory}; lower "
                        "the learning rate (or add optimizer.grad_clip_norm) and rerun")
                step += 1
                window.append({k: float(v) for k, v in metrics.items() if k != "finite"})
                bar.update(1)
                if step % config.log_every_steps == 0 or step == config.total_steps:
                    dt = time.time() - t_window
                    avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    avg["img_per_s"] = len(window) * images_per_step / max(dt, 1e-9)
                    writer.write(step, avg)
                    bar.set_postfix(loss=f"{avg['loss']:.4f}", img_s=f"{avg['img_per_s']:.0f}",
                                    lr=f"{avg['lr']:.2g}", refresh=False)
                    window, t_window = [], time.time()
                if step % config.eval_every_steps == 0 or step == config.total_steps:
                    last_eval = evaluate(setup, eval_step, state, eval_ds)
                    writer.write(step, last_eval)
                    if primary:
                        bar.write(f"step {step}: eval top-1 {last_eval['eval_top1']:.2%}  "
                                  f"top-5 {last_eval['eval_top5']:.2%}  "
                                  f"loss {last_eval['eval_loss']:.4f}")
                    if config.schedule.name == "plateau":
                        _, plateau_state = plateau.update(
                            {}, plateau_state, value=jnp.float32(1.0 - last_eval["eval_top1"]))
                        if float(plateau_state.scale) != lr_scale:
                            lr_scale = float(plateau_state.scale)
                            log.info("validation accuracy plateaued: learning rate x%g", lr_scale)
                    t_window = time.time()  # evaluation time is not training throughput
                if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
                    save(step)
            mngr.wait_until_finished()
    finally:
        bar.close()
        writer.close()
        mngr.close()
    if final["status"] == "done" and last_eval is None:
        last_eval = evaluate(setup, eval_step, state, eval_ds)  # resumed at the end: report it
    if last_eval is not None:
        final.update(last_eval)
    if primary:
        plot_metrics(workdir)
    final.update(step=step, wall_time_s=time.time() - t_start, workdir=str(workdir))
    final["state"] = state
    return final


# -- export -----------------------------------------------------------------------------------
def read_run(workdir: Path):
    f = Path(workdir) / CONFIG_FILE
    if not f.is_file():
        raise ConfigError(f"{workdir} is not a training directory (no {CONFIG_FILE}); pass the "
                          "--workdir of a train/train.py run")
    d = json.loads(f.read_text())
    return ml_collections.ConfigDict(d["config"]), input_pipeline.DatasetInfo(**d["dataset_info"])


def restore_variables(workdir: str | os.PathLike, step: int | None = None):
    """(config, model, {"params", "batch_stats"}, step) from a training directory, on one device."""
    workdir = Path(workdir).absolute()
    config, info = read_run(workdir)
    mesh = sharding.make_mesh(1, 1, jax.local_devices()[:1])
    setup = Setup(config, info, mesh)
    mngr = checkpoint_manager(workdir, config, read_only=True)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}")
        if step is not None and step not in steps:
            raise ConfigError(f"no checkpoint at step {step}; available: {steps}")
        if step is None:
            step, state, _ = restore_latest(mngr, workdir, setup.abstract_sharded)
            if state is None:
                raise ConfigError(f"no readable checkpoint in {workdir / 'checkpoints'}")
        else:
            state = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(setup.abstract_sharded)))["state"]
    finally:
        mngr.close()
    variables = {"params": state["params"]}
    if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
    return config, setup.model, jax.device_get(variables), step


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
           force: bool = False) -> Path:
    """Write the trained variables of ``workdir`` in ``vgg_flax.save`` format (fp32 module)."""
    config, model, variables, step = restore_variables(workdir, step)
    module = model.clone(dtype=jnp.float32)
    extra = {"trained": {"workdir": str(Path(workdir).absolute()), "step": int(step),
                         "dataset": config.dataset}}
    names = read_run(workdir)[1].class_names  # folder datasets: classify prints these names
    if names:
        extra["categories"] = list(names)
    return vgg_flax.save(out, variables, config.model, module=module, extra=extra, force=force)


# -- memory -----------------------------------------------------------------------------------
def state_memory(config, num_classes: int = 1000, channels: int = 3) -> dict[str, float]:
    """Per-device bytes of the training state (params + optimizer + batch_stats) as laid out by
    the config's mesh and rules, from the compiled init program's memory analysis."""
    config = resolved(config)
    data, model = sharding.mesh_shape(config.mesh.data, config.mesh.model, jax.device_count())
    mesh = sharding.make_mesh(data, model)
    setup = Setup(config, input_pipeline.DatasetInfo(num_classes, channels, 0, 0), mesh)
    compiled = jax.jit(setup.init, out_shardings=setup.shardings).lower(
        jax.random.key(0)).compile()
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
    import re
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


def step_memory(config, batch_size: int, num_classes: int = 1000,
                channels: int = 3) -> dict[str, float]:
    """Per-device memory and communication of one compiled training step (nothing runs).

    ``argument``: the sharded state and batch; ``temp``: activations, gradients and XLA's
    scratch; ``collectives``: bytes per collective kind per device per step.
    """
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
    compiled = make_train_step(setup).lower(setup.abstract_sharded, batch, lr).compile()
    mem = compiled.memory_analysis()
    return {"devices": data * model, "argument_bytes": mem.argument_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "collectives": collective_bytes(compiled.as_text())}
