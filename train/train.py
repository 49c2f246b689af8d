"""Train a VGG: ``python train/train.py`` (the digits demo) or
``python train/train.py --config train/configs/NAME.py --workdir DIR [--config.key=value ...]``.

Multi-host: ``--coordinator_address host:port --num_processes N --process_id I`` on every host
(omit them on TPU pods and SLURM, where they are detected). Rerunning the same command resumes
from DIR/checkpoints.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, not train/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIGS = Path(__file__).resolve().parent / "configs"
config_flags.DEFINE_config_file("config", str(_CONFIGS / "digits.py"),
                                "Training config file (train/configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); "
                    "default runs/<config>-<time>.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
FLAGS = flags.FLAGS


def _cluster_detected() -> bool:
    """TPU pod and SLURM environments where jax.distributed.initialize() needs no arguments."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return slurm or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    import jax
    if coordinator_address or num_processes or process_id is not None:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            # CPU collectives across processes go through gloo (localhost tests, CPU clusters).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("vgg_flax.train").setLevel(logging.INFO)
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax
    from train import trainer

    config = FLAGS.config
    workdir = FLAGS.workdir
    if workdir is None:
        name = Path(config_flags.get_config_filename(FLAGS["config"])).stem
        workdir = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    primary = jax.process_index() == 0
    try:
        if primary:
            print(f"vgg_flax train: {config.model} on {config.dataset}, {jax.device_count()} "
                  f"device(s) x {jax.process_count()} process(es), workdir {workdir}", flush=True)
        result = trainer.train_and_evaluate(config, workdir)
    except trainer.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except trainer.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if primary:
        if result["status"] == "preempted":
            print(f"stopped by SIGTERM at step {result['step']}; checkpoint saved in "
                  f"{workdir}/checkpoints; rerun the same command to resume")
        else:
            print(f"final: step {result['step']}, {config.eval_split} top-1 "
                  f"{result['eval_top1']:.2%}, top-5 {result['eval_top5']:.2%} "
                  f"({result['eval_examples']} images), {result['wall_time_s']:.0f} s, "
                  f"curves in {workdir}/curves.png")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
