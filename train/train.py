"""Train a VGG: ``python train/train.py`` (the digits demo) or
``python train/train.py --config train/configs/NAME.py --workdir DIR [--config.key=value ...]``.

Multi-host: ``--coordinator_address host:port --num_processes N --process_id I`` on every host
(omit them on TPU pods and SLURM, where they are detected). Rerunning the same command resumes
from DIR/checkpoints; SIGTERM or Ctrl-C saves a checkpoint and stops.

Exit status: 0 done or preempted (SIGTERM), 2 bad flags/config/workdir, 3 the loss diverged,
130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, not train/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

if __name__ == "__main__":  # first of all: Ctrl-C during the seconds of imports exits cleanly too
    from train.signals import ExitOnInterrupt
    _INTERRUPT = ExitOnInterrupt("interrupted (Ctrl-C) while starting; nothing was saved").install()

from absl import flags, logging as absl_logging
from ml_collections import config_flags

_CONFIGS = Path(__file__).resolve().parent / "configs"


def _define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    # The config flag reads its --config.key=value overrides from argv when it is defined.
    config_flags.DEFINE_config_file("config", str(_CONFIGS / "digits.py"),
                                    "Training config file (train/configs/NAME.py).",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); "
                        "default runs/<config>-<time>.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).",
                         flag_values=fv)


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for a flag that could not be parsed (ml_collections raises KeyError or
    AttributeError with a multi-line 'Did you mean' text for an unknown config key)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    if isinstance(e, (KeyError, AttributeError)):
        for arg in argv:
            m = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
            if m and f"'{m.group(1).split('.')[-1]}'" in text:
                hint = re.search(r'Did you mean "([^"]+)"', text)
                parent = m.group(1).rpartition(".")[0]
                fix = (f"did you mean --config.{parent + '.' if parent else ''}{hint.group(1)}?"
                       if hint else "the keys are listed in train/configs/base.py")
                return f"unknown config key {m.group(1)!r} in {arg}; {fix}"
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


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


def main(argv: list[str], interrupt=None) -> int:
    """The CLI, callable in-process: ``main(["train.py", "--workdir", DIR, ...])`` -> exit status.
    ``interrupt``: the process's ``signals.ExitOnInterrupt``, whose message names the workdir."""
    fv = flags.FlagValues()
    for i, a in enumerate(argv[1:], 1):
        path = a.split("=", 1)[1] if re.match(r"--?config=", a) else (
            argv[i + 1] if a in ("--config", "-config") and i + 1 < len(argv) else None)
        if path is not None and not Path(path).is_file():
            print(f"error: config file {path} not found; see train/configs/", file=sys.stderr)
            return 2
    try:
        _define_flags(fv, argv)
        if any(a in ("-h", "--help", "--helpfull", "-?") for a in argv[1:]):
            print(__doc__ + "\n" + fv.get_help())
            return 0
        rest = fv(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}; flags are --name=value", file=sys.stderr)
        return 2
    import logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("vgg_flax.train").setLevel(logging.INFO)
    init_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
    import jax
    from train import trainer

    config = fv.config
    workdir = fv.workdir
    if workdir is None:
        name = Path(config_flags.get_config_filename(fv["config"])).stem
        workdir = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    primary = jax.process_index() == 0
    stopped = (f"interrupted (Ctrl-C) before a checkpoint could be saved; the checkpoints in "
               f"{workdir}/checkpoints are as they were")
    if interrupt is not None:
        interrupt.message = stopped
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
    except KeyboardInterrupt:  # in-process callers (the command line exits in its handler)
        print(stopped, file=sys.stderr)
        return 130
    if result["status"] in ("preempted", "interrupted"):
        if primary:
            how = "SIGINT (Ctrl-C)" if result["status"] == "interrupted" else "SIGTERM"
            print(f"stopped by {how} at step {result['step']}; checkpoint saved in "
                  f"{workdir}/checkpoints; rerun the same command to resume")
        return 130 if result["status"] == "interrupted" else 0
    if primary:
        print(f"final: step {result['step']}, {config.eval_split} top-1 "
              f"{result['eval_top1']:.2%}, top-5 {result['eval_top5']:.2%} "
              f"({result['eval_examples']} images), {result['wall_time_s']:.0f} s, "
              f"curves in {workdir}/curves.png")
    return 0


def _exit(code: int) -> None:
    """Leave without interpreter teardown, which segfaults when it runs while XLA's or the input
    pipeline's threads still work (after Ctrl-C, an error, a stop mid-epoch)."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        jax.distributed.shutdown()  # what teardown would have done: the processes leave together
    from train.signals import exit_now
    exit_now(code)


if __name__ == "__main__":
    absl_logging.use_absl_handler()  # INFO lines ("resumed from ...") on stderr, as app.run did
    flags.FLAGS.mark_as_parsed()  # absl's global flags (main parses its own): else the first
    #                               log line comes with "Logging before flag parsing goes to stderr"
    _exit(main(sys.argv, _INTERRUPT))
