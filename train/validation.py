"""Configuration: load a config file, and every check that needs no data and no compilation.

Each failure is a ConfigError whose message is one line naming the key, the value and the fix.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from pathlib import Path

import jax
import ml_collections

import vgg_flax
from train import input_pipeline, sharding
from vgg_flax.fields import FIELDS, field_problem

REQUIRED_KEYS = ("model", "dataset", "batch_size", "total_steps", "checkpoint_every_steps",
                 "eval_every_steps", "seed", "mesh.data", "mesh.model")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem and the fix."""


def check_writable_dir(path: Path, what: str, *, file_fix: str, unwritable_fix: str) -> None:
    """``path`` is a directory we can write in, or can be created as one: else one line saying
    which (a file in its place, or the nearest existing parent not writable) and the fix."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory; {file_fix}")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; {unwritable_fix}")


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients, or the parameters) stopped being finite."""


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


def resolved(config) -> ml_collections.ConfigDict:
    """A copy with derived defaults filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    with config.unlocked():
        if not config.get("eval_batch_size"):
            config.eval_batch_size = config.batch_size
    return config


def _number(config, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, integer: bool = False) -> None:
    """``key`` is a finite number in [low, high] (open ends where asked)."""
    try:
        value = _get(config, key)
    except (KeyError, AttributeError):
        return  # optional keys (validate() checks the required ones first)
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if high == math.inf:
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be {kind} {where}, got {value!r}; set --config.{key}")


def _check_ranges(config) -> None:
    """Values that would compile and then fail or silently train nothing: non-finite or
    negative rates, zero sizes, probabilities outside [0, 1)."""
    inf = math.inf
    for key in ("batch_size", "total_steps", "checkpoint_every_steps", "eval_every_steps",
                "log_every_steps", "grad_accum_steps", "keep_checkpoints", "eval_batch_size",
                "input.crop_size", "input.resize_size", "input.scale_min", "input.scale_max",
                "input.num_threads"):
        _number(config, key, 0, low_open=True, integer=True)
    for key in ("schedule.warmup_steps", "schedule.plateau_patience", "schedule.plateau_cooldown",
                "input.prefetch"):
        _number(config, key, 0, integer=True)
    _number(config, "learning_rate", 0, low_open=True)
    for key in ("optimizer.weight_decay", "optimizer.grad_clip_norm", "input.colour_shift",
                "schedule.plateau_rtol"):
        _number(config, key, 0)
    for key in ("optimizer.momentum", "optimizer.b1", "optimizer.b2", "label_smoothing"):
        _number(config, key, 0, 1, high_open=True)
    _number(config, "optimizer.eps", 0, low_open=True)
    _number(config, "schedule.plateau_factor", 0, 1, low_open=True)
    for key in ("mean", "std"):
        values = config.input.get(key)
        if values is not None and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                          for v in values):
            raise ConfigError(f"input.{key} must be finite numbers, got {values!r}")
    if any(s <= 0 for s in config.input.get("std", ())):
        raise ConfigError(f"input.std must be positive, got {config.input.std!r}")


# model_overrides the trainer sets itself (make_model).
_SET_BY_TRAINER = {"num_classes": "the dataset sets it", "dtype": "set compute_dtype instead"}


def check_model(config) -> None:
    """``model`` and ``model_overrides``: a classification VGG whose fields pass the VGG's own
    rules (``vgg_flax.fields.FIELDS``, which ``create``, ``load`` and the converter use), so a
    run never trains a model that export cannot write or ``vgg_flax.load`` cannot read."""
    if config.model not in vgg_flax.list_models():
        raise ConfigError(f"unknown model {config.model!r}; choose one of: "
                          f"{', '.join(vgg_flax.list_models())}")
    if vgg_flax.create(config.model).head != "fc":
        raise ConfigError(f"{config.model} has no classifier head; train a classification VGG")
    overrides = {k: v for k, v in config.model_overrides.to_dict().items() if v is not None}
    for key, value in overrides.items():
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            fix = f"did you mean --config.model_overrides.{near[0]}?" if near else (
                f"VGG's fields are {', '.join(FIELDS)}")
            raise ConfigError(f"model_overrides.{key} is not a VGG field; {fix}")
        if key in _SET_BY_TRAINER:
            raise ConfigError(f"model_overrides.{key} cannot be set ({_SET_BY_TRAINER[key]}); "
                              f"remove --config.model_overrides.{key}")
        problem = field_problem(key, value) if key in FIELDS else None
        if problem:
            raise ConfigError(f"model_overrides.{problem}; set --config.model_overrides.{key}")
        if (key == "taps" and value) or (key == "include_top" and not value):
            raise ConfigError(f"model_overrides.{key}={value!r}: training needs the classifier's "
                              f"logits; remove --config.model_overrides.{key}")
    try:
        vgg_flax.create(config.model, **overrides)
    except (TypeError, ValueError) as e:  # an unknown field, or fields VGG refuses together
        raise ConfigError(f"config.model_overrides: {e}") from None


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
    check_model(config)
    _check_ranges(config)
    _check_dataset_name(config.dataset)
    try:
        data, model = sharding.mesh_shape(config.mesh.data, config.mesh.model, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    except tfds.core.DatasetNotFoundError:
        raise ConfigError(f"unknown dataset {name!r}: use 'digits' or a TFDS dataset name "
                          "(tfds.list_builders())") from None
