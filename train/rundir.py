"""The run directory: ``train_config.json`` (written, read, and compared on resume), and the
trained variables read back from ``DIR/checkpoints`` for export.

A rerun of the same command resumes. A rerun with another config must not silently turn the
run into a different one, so keys that change what is computed are compared with the
workdir's ``train_config.json``; keys that only change when things happen (CADENCE_KEYS) or
where they run (PLACEMENT_KEYS) may change freely.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import vgg_flax
from train import input_pipeline, sharding
from train.checkpoints import checkpoint_manager, restore_latest, restore_step
from train.state import Setup
from train.validation import ConfigError, check_model, check_writable_dir

log = logging.getLogger("vgg_flax.train")

CONFIG_FILE = "train_config.json"
# When things happen: how long, how often to log, evaluate and checkpoint, how many to keep.
CADENCE_KEYS = frozenset({"total_steps", "eval_every_steps", "checkpoint_every_steps",
                          "log_every_steps", "keep_checkpoints"})
# Where and how fast it runs, not what it computes: devices and layouts (the sharding tests show
# the same parameters), host threads, evaluation batching (masked), dataset preparation.
PLACEMENT_KEYS = frozenset({"mesh.data", "mesh.model", "sharding", "eval_batch_size",
                            "async_checkpointing", "input.num_threads", "input.prefetch",
                            "manual_dir", "download", "allow_config_change"})


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CADENCE_KEYS | PLACEMENT_KEYS)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=list))


def has_checkpoints(workdir: Path) -> bool:
    d = Path(workdir) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_workdir(workdir: Path) -> None:
    """--workdir must be a directory (or not exist yet) that we can write in."""
    check_writable_dir(workdir, "--workdir", file_fix="pass a directory (it is created if missing)",
                       unwritable_fix="pass another --workdir")


class WorkdirBusy(ConfigError):
    """Another trainer is running in the workdir."""


LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive ``flock`` on ``DIR/.lock`` for the life of a run. Two trainers in one workdir
    would both train, write every step's metrics twice and save the same steps over each other;
    the second is refused (WorkdirBusy, naming the first's pid and host, which the file holds).
    The kernel releases the lock when its holder ends, however it ends: a run killed with
    SIGKILL never blocks its own resume. Taken by process 0 only: all processes of one run
    share the workdir (each writes its shards of a checkpoint), the others follow its answer."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid not written yet"
            os.close(fd)
            raise WorkdirBusy(f"{self.path.parent} is in use by another trainer ({holder}); wait "
                              "for it to end or stop it, or pass another --workdir") from None
        except OSError as e:  # a file system without locks (some network mounts)
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure no other trainer uses this workdir",
                        self.path, e.strerror or e)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None


@contextlib.contextmanager
def workdir_lock(workdir: Path, primary: bool):
    """Process 0 creates the workdir and takes its WorkdirLock; every process of the run raises
    WorkdirBusy when process 0 could not."""
    busy, lock = None, WorkdirLock(workdir) if primary else None
    if lock is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except WorkdirBusy as e:
            busy = e
    if jax.process_count() > 1:  # also the barrier after the mkdir
        from jax.experimental import multihost_utils
        refused = multihost_utils.process_allgather(np.int32(busy is not None)).max()
        if refused and busy is None:
            busy = WorkdirBusy(f"{workdir} is in use by another trainer (process 0 says which)")
    if busy is not None:
        raise busy
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def config_changes(config, workdir: Path) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for every key that differs from the workdir's train_config.json."""
    f = Path(workdir) / CONFIG_FILE
    if not f.is_file():
        return {}
    try:
        saved = _flat(json.loads(f.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{f} is unreadable ({type(e).__name__}); restore it, or use a new "
                          "--workdir") from None
    from train.configs.base import base  # keys added since the run started: their defaults
    defaults = _flat(_jsonable(base()))
    now = _flat(_jsonable(config))
    missing = object()
    out = {}
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, defaults.get(key, missing)), now.get(key, missing)
        if old != new:
            out[key] = (None if old is missing else old, None if new is missing else new)
    return out


def check_drift(config, workdir: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse (ConfigError) to resume ``workdir``'s checkpoints under a config whose meaning
    differs from its train_config.json, unless ``allow_config_change``. Returns the changes."""
    if not has_checkpoints(workdir):
        return {}  # nothing to resume: the run starts over and rewrites train_config.json
    changes = config_changes(config, workdir)
    meaning = {k: v for k, v in changes.items() if not _free(k)}
    if meaning and not config.get("allow_config_change"):
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in list(meaning.items())[:5])
        more = f" (and {len(meaning) - 5} more)" if len(meaning) > 5 else ""
        raise ConfigError(f"{workdir} holds a run with another config: {shown}{more}; use a new "
                          "--workdir, or pass --config.allow_config_change=True to continue "
                          "this run under the new values")
    if meaning:
        log.warning("continuing %s with changed %s (allow_config_change)", workdir,
                    ", ".join(meaning))
    if "total_steps" in changes and config.schedule.name == "cosine":
        log.warning("total_steps changed: the cosine schedule now decays over %d steps",
                    config.total_steps)
    return changes


def write_run_config(workdir: Path, config, info, changes: dict | None = None,
                     step: int = 0) -> None:
    """DIR/train_config.json (atomically), with a history of the changes resumed under."""
    f = workdir / CONFIG_FILE
    history = []
    if f.is_file():
        try:
            history = json.loads(f.read_text()).get("changes", [])
        except ValueError:
            history = []
    if changes:
        history.append({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "keys": {k: list(v) for k, v in changes.items()}})
    body = {"config": config.to_dict(), "dataset_info": vars(info)}
    if history:
        body["changes"] = history
    tmp = workdir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(body, indent=1, default=list))
    os.replace(tmp, f)


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
    check_model(config)  # a run from before a field was checked: one line, not a traceback
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
        else:
            state = restore_step(mngr, step, setup.abstract_sharded)
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
