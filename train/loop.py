"""The training loop, in big_vision's order:

    config -> checks -> mesh -> data -> model -> abstract init (jax.eval_shape) -> shardings from
    rules -> restore (or jax.jit(init, out_shardings) and warm start) -> jitted update with the
    state donated -> loop (progress bar, metrics, periodic evaluation, checkpoints) -> plot

One program for one CPU and for a pod: everything is ``jax.jit`` over a ('data', 'model') mesh
with NamedSharding; each process feeds only its rows of the global batch.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from train import compile_cache, input_pipeline, rundir, sharding
from train.checkpoints import checkpoint_manager, restore_latest, save_state
from train.metrics import MetricWriter, plot_metrics
from train.signals import StopFlag
from train.state import Setup, make_plateau, plateau_from_json, plateau_to_json
from train.steps import evaluate, global_batch, make_eval_step, make_train_step
from train.validation import ConfigError, TrainingDiverged, resolved, validate
from train.warm_start import warm_start

log = logging.getLogger("vgg_flax.train")


def prepare(config, workdir):
    """Checks, mesh, data and shapes: everything before compilation (errors are ConfigError)."""
    config = resolved(config)
    data, model = validate(config)
    workdir = Path(workdir).absolute()
    rundir.check_workdir(workdir)
    rundir.check_drift(config, workdir)
    mesh = sharding.make_mesh(data, model)
    try:
        train_src = input_pipeline.get_source(config, config.train_split)
        eval_src = input_pipeline.get_source(config, config.eval_split)
        info = input_pipeline.dataset_info(config, train_src, eval_src)
    except input_pipeline.DataError as e:
        raise ConfigError(str(e)) from None
    setup = Setup(config, info, mesh)
    return setup, train_src, eval_src


def _diverged(metrics, step: int, good: int | None, directory) -> TrainingDiverged:
    """One line naming the values that stopped being finite and the checkpoint to go back to."""
    values = {"loss": float(metrics["loss"]), "gradient norm": float(metrics["grad_norm"]),
              "parameter norm": float(metrics["param_norm"])}
    bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
    where = (f"the last good checkpoint is step {good} in {directory}; rerun with a lower "
             "--config.learning_rate (or --config.optimizer.grad_clip_norm) and "
             "--config.allow_config_change=True to continue from it"
             if good is not None else
             "no checkpoint was saved before it; rerun with a lower --config.learning_rate "
             "(or --config.optimizer.grad_clip_norm)")
    return TrainingDiverged(f"{bad} not finite at step {step}: stopped; {where}")


SKIPPED_NAMED = 5


def skipped_files(*sources) -> dict[str, Any]:
    """How many files of ``sources`` could not be decoded in this process so far (folder
    datasets' ``SkipLog``), per split, and the first few paths in the order they were met."""
    paths, per_split = [], {}
    for src in sources:
        log_ = getattr(src, "skipped", None)
        if log_ is not None and len(log_):
            per_split[log_.split] = per_split.get(log_.split, 0) + len(log_)
            paths += [p for p in list(log_.paths) if p not in paths]
    return {"skipped_files": len(paths), "skipped_per_split": per_split,
            "skipped_first": paths[:SKIPPED_NAMED]}


def skipped_line(summary: dict[str, Any]) -> str:
    """The end-of-run line: the count, per split, and the first few paths."""
    n, shown = summary["skipped_files"], summary["skipped_first"]
    splits = ", ".join(f"{k} {v}" for k, v in summary["skipped_per_split"].items())
    more = f" and {n - len(shown)} more" if n > len(shown) else ""
    return (f"{n} undecodable file(s) skipped during this run ({splits}): "
            f"{', '.join(shown)}{more}; the reasons are in the warnings above")


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (resuming from DIR/checkpoints when there is one) and evaluate. Returns the final
    metrics and ``status`` ("done", "preempted" after SIGTERM, "interrupted" after SIGINT);
    raises TrainingDiverged on NaN/inf, ConfigError before compiling anything (WorkdirBusy
    while another trainer holds the workdir's lock)."""
    t_start = time.time()
    workdir = Path(workdir).absolute()
    setup, train_src, eval_src = prepare(config, workdir)
    cache = compile_cache.resolve(setup.config, workdir)
    with rundir.workdir_lock(workdir, jax.process_index() == 0):  # WorkdirBusy: a ConfigError
        compile_cache.use(cache)
        return _train(setup, train_src, eval_src, workdir, t_start, cache)


def _train(setup, train_src, eval_src, workdir: Path, t_start: float,
           cache: Path | None = None) -> dict[str, Any]:
    from tqdm import tqdm
    config = setup.config
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    hits = compile_cache.counter()
    hits0, misses0, entries0 = hits.hits, hits.misses, compile_cache.entries(cache)

    train_ds = input_pipeline.train_dataset(config, train_src, pi, pc)
    eval_ds = input_pipeline.eval_dataset(config, eval_src, pi, pc)
    train_iter = iter(train_ds)

    mngr = checkpoint_manager(workdir, config)
    plateau = make_plateau(config)
    plateau_state = plateau.init({})
    try:
        step, state, meta = restore_latest(mngr, workdir, setup.abstract_sharded, train_iter)
    except BaseException:
        mngr.close()
        raise
    changes = rundir.config_changes(config, workdir) if step is not None else {}
    if primary:  # only now: a run refused above leaves its train_config.json as it was
        rundir.write_run_config(workdir, config, setup.info, changes, step or 0)
    if state is None:
        state = setup.jit_init()(jax.random.key(config.seed))
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
            state=save_state(state), meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(train_iter)), force=True)

    try:
        with StopFlag() as stop:
            while step < config.total_steps:
                if stop.agreed():
                    if mngr.latest_step() != step:  # not already saved by the loop
                        save(step)
                    mngr.wait_until_finished()
                    name = stop.signal_name or "SIGTERM"
                    final["status"] = "interrupted" if name == "SIGINT" else "preempted"
                    final["signal"] = name
                    log.warning("%s: checkpoint saved at step %d in %s; rerun the same "
                                "command to resume", name, step, mngr.directory)
                    break
                batch = global_batch(setup, next(train_iter))
                state, metrics = train_step(state, batch, jnp.float32(lr_scale))
                if "first_step_s" not in final:  # compiled (or read) and dispatched: it runs now
                    t_dispatched = time.time() - t_start
                metrics = jax.device_get(metrics)
                if not metrics["finite"]:
                    mngr.wait_until_finished()
                    raise _diverged(metrics, step + 1, mngr.latest_step(), mngr.directory)
                step += 1
                if "first_step_s" not in final:
                    final["first_step_s"] = time.time() - t_start
                    final["compile_cache_hits"] = hits.hits - hits0
                    log.info("first step dispatched %.1f s and done %.1f s after start; "
                             "compilation cache %s: %d program(s) read from it, %d looked up and "
                             "compiled", t_dispatched, final["first_step_s"], cache or "off",
                             hits.hits - hits0, hits.misses - misses0)
                window.append({k: float(v) for k, v in metrics.items()
                               if k not in ("finite", "param_norm")})
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
                    record = dict(last_eval)
                    if step == config.total_steps:  # the run's last record: what it skipped
                        record.update({k: final[k] for k in ("first_step_s",
                                                             "compile_cache_hits") if k in final})
                        record.update(skipped_files(train_src, eval_src))
                    writer.write(step, record)
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
    final.update(skipped_files(train_src, eval_src))
    if primary:
        if final["skipped_files"]:
            log.warning("%s", skipped_line(final))
        if cache is not None:
            log.info("compilation cache %s: %d program(s) read from it, %d new", cache,
                     hits.hits - hits0, compile_cache.entries(cache) - entries0)
        plot_metrics(workdir)
    final.update(step=step, wall_time_s=time.time() - t_start, workdir=str(workdir))
    final["state"] = state
    return final
