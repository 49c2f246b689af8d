"""Checkpoints (orbax, ``DIR/checkpoints``): the manager, and the resume policy.

Resuming never destroys or hides work. A checkpoint is only set aside when it is damaged
(truncated or garbage files, a half-written step): then the previous step is used, as after a
crash. A checkpoint that holds another model or optimizer is the config's problem, not the
checkpoint's: CheckpointMismatch names the first differences and nothing is moved. Any other
error (out of memory, a failing disk) propagates with its own message.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.sharding import path_str
from train.validation import ConfigError

log = logging.getLogger("vgg_flax.train")

# tensorstore status codes that mean the bytes on disk are wrong, not that reading them failed
# at the moment (UNAVAILABLE, PERMISSION_DENIED, RESOURCE_EXHAUSTED... propagate).
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


class CheckpointMismatch(ConfigError):
    """The checkpoints in a workdir belong to another model or optimizer than the config's."""


class NoReadableCheckpoint(ConfigError):
    """Every checkpoint in a workdir is damaged."""


@contextlib.contextmanager
def _orbax_notes_off():
    """Without orbax's WARNING note on what we chose on purpose: opening the checkpoints
    read-only ("Given directory is read only"). It goes through absl's logger, which is orbax's;
    errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The train state is written by a PyTree handler with its own type handler registry and
    read by orbax's standard handler (the same files): handler options are chosen per manager,
    orbax's global registry stays as it is (overriding an entry there logs a warning every run).

    Replica-parallel saving (each replica writes a slice of a replicated array) compiles a
    slicing program per array shape; worth it for fc6's 400 MB, not for a 64-element bias."""
    th = ocp.type_handlers
    types = [(ty, th.get_type_handler(ty))
             for ty in (int, float, bytes, np.number, np.ndarray, str)]
    types.append((jax.Array, th.ArrayHandler(use_replica_parallel=True,
                                             min_slice_bytes_for_replica_parallel=2 ** 24)))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(
        type_handler_registry=th.create_type_handler_registry(*types)))
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
    return registry


def save_state(state) -> ocp.args.PyTreeSave:
    """The ``state`` item's save args for ``checkpoint_manager``'s managers."""
    return ocp.args.PyTreeSave(state)


def checkpoint_manager(workdir: Path, config, read_only: bool = False) -> ocp.CheckpointManager:
    if read_only:  # export: reads, writes nothing (and so needs no saving options)
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
            save_interval_steps=0)
        with _orbax_notes_off():
            return ocp.CheckpointManager(workdir / "checkpoints", options=options)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True,
        enable_async_checkpointing=config.async_checkpointing, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options,
                                 handler_registry=_handlers())


def _shapes(tree) -> dict[str, tuple]:
    """'params/fc7/kernel' -> (shape, dtype name) for every array leaf."""
    return {path_str(path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape")}


class _Damaged(Exception):
    """A checkpoint step whose files are unreadable (the message says why)."""


def _is_damage(e: BaseException) -> bool:
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError)):
        return True
    if type(e) is ValueError:  # tensorstore reports its status code at the start of the message
        return str(e).lstrip().startswith(_DAMAGE_CODES)
    return False


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def check_fits(step_dir: Path, abstract_state, directory) -> None:
    """Raise CheckpointMismatch when the arrays saved at ``step_dir`` are not the arrays of
    ``abstract_state`` (other names, shapes or dtypes); _Damaged when their metadata is unreadable."""
    try:
        saved = _shapes(ocp.StandardCheckpointHandler().metadata(step_dir / "state"))
    except (ValueError, KeyError, TypeError, EOFError, FileNotFoundError) as e:
        if _is_damage(e) or isinstance(e, (KeyError, TypeError)) or type(e) is ValueError:
            raise _Damaged(f"{type(e).__name__}: {_first_line(e)}") from e
        raise
    wanted = _shapes(abstract_state)
    if not saved:
        raise _Damaged("no arrays in its metadata")
    diffs = []
    order = lambda n: (not n.startswith("params/"), n.rpartition("/")[0], not n.endswith("kernel"))
    for name in sorted(set(saved) | set(wanted), key=order):
        if name not in wanted:
            diffs.append(f"{name} {saved[name][0]} is not in this config's model")
        elif name not in saved:
            diffs.append(f"{name} {wanted[name][0]} is not in the checkpoint")
        elif saved[name] != wanted[name]:
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
            diffs.append(f"{name} {s_shape} vs {w_shape}" if s_shape != w_shape
                         else f"{name} {s_dtype} vs {w_dtype}")
    if diffs:
        what = ("another model" if any(d.startswith(("params/", "batch_stats/")) for d in diffs)
                else "another optimizer state")
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointMismatch(
            f"checkpoints in {directory} hold {what}: {'; '.join(diffs[:3])}{more}; use a new "
            "--workdir, or warm-start with --config.init_from")


def _restore_one(mngr, step: int, abstract_state, train_iter):
    check_fits(Path(mngr.directory) / str(step), abstract_state, mngr.directory)
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if train_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(train_iter)
    try:
        r = mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, EOFError, FileNotFoundError) as e:  # what _is_damage can recognise
        if _is_damage(e):
            raise _Damaged(f"{type(e).__name__}: {_first_line(e)}") from e
        raise
    if not isinstance(r["meta"], dict) or "plateau" not in r["meta"]:
        raise _Damaged("its meta item has no plateau state")
    return r["state"], r["meta"]


def restore_step(mngr, step: int, abstract_state):
    """The state saved at ``step`` (export of a chosen step); ConfigError if it does not fit
    ``abstract_state`` or is damaged."""
    try:
        return _restore_one(mngr, step, abstract_state, None)[0]
    except _Damaged as e:
        raise ConfigError(f"checkpoint step {step} in {mngr.directory} is damaged ({e}); "
                          "pick another --step") from None


def restore_latest(mngr, workdir: Path, abstract_state, train_iter=None):
    """(step, state, meta) from the newest readable checkpoint, or (None, None, None) if there is
    none. Damaged steps are skipped with a warning and, when resuming (``train_iter`` given),
    moved to ``DIR/corrupt_checkpoints``. Raises CheckpointMismatch (nothing moved) when a
    checkpoint holds another model, NoReadableCheckpoint when every step is damaged."""
    bad = []
    result = (None, None, None)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            state, meta = _restore_one(mngr, step, abstract_state, train_iter)
        except _Damaged as e:
            log.warning("checkpoint step %d in %s is unreadable (%s); falling back to the "
                        "previous one", step, mngr.directory, e)
            bad.append(step)
            continue
        result = (step, state, meta)
        break
    if bad and result[0] is None:
        raise NoReadableCheckpoint(
            f"every checkpoint in {mngr.directory} is damaged (steps {sorted(bad)}); move "
            "the directory away to start again, or use a new --workdir")
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
