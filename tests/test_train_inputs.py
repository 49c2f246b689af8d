"""train/train.py's bad-input contract (issue 15), in-process through ``main(argv)``: every bad
flag, config value or workdir is one ``error:`` line on stderr, exit 2, before anything is
compiled or created. The NaN message names the values that really stopped being finite.
Budget: a few seconds (nothing compiles)."""
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from train import loop, trainer
from train import train as train_cli

TINY = ["--config.model_overrides.width=0.125", "--config.model_overrides.hidden_size=16",
        "--config.batch_size=16", "--config.input.crop_size=32", "--config.input.resize_size=32",
        "--config.input.scale_min=32", "--config.input.scale_max=40"]


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=32"], "unknown config key 'batchsize' in --config.batchsize=32; "
                                "did you mean --config.batch_size?"),
    (["--config.model_overrides.hidden_sise=8"], "did you mean --config.model_overrides.hidden_size?"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: invalid literal for int()"),
    (["--config=train/configs/nope.py"], "config file train/configs/nope.py not found"),
    (["--workdri=x"], "Unknown command line flag 'workdri'"),
    (["stray"], "unexpected arguments ['stray']"),
    (["--config.learning_rate=nan"], "learning_rate must be a finite number > 0, got nan"),
    (["--config.learning_rate=-0.1"], "learning_rate must be a finite number > 0, got -0.1"),
    (["--config.learning_rate=0"], "learning_rate must be a finite number > 0"),
    (["--config.learning_rate=inf"], "learning_rate must be a finite number > 0, got inf"),
    (["--config.model_overrides.width=0"],
     "model_overrides.width (channel multiplier) must be a finite number > 0, got 0"),
    (["--config.model_overrides.hidden_size=0"],
     "model_overrides.hidden_size (fc6/fc7 width, conv6/conv7 for SSD) must be a positive integer, got 0"),
    # an int for a pair would train (as (7,)) and export a checkpoint load refuses (issue 26)
    (["--config.model_overrides.pool_size=7"],
     "model_overrides.pool_size (pool5's adaptive average pool output) must be two positive "
     "integers (H, W), e.g. (7, 7), got (7,); set --config.model_overrides.pool_size"),
    (["--config.input.crop_size=0"], "input.crop_size must be an integer > 0"),
    (["--config.batch_size=0"], "batch_size must be an integer > 0"),
    (["--config.total_steps=-5"], "total_steps must be an integer > 0"),
    (["--config.log_every_steps=0"], "log_every_steps must be an integer > 0"),
    (["--config.keep_checkpoints=0"], "keep_checkpoints must be an integer > 0"),
    (["--config.optimizer.momentum=1.5"], "optimizer.momentum must be a finite number in [0, 1)"),
    (["--config.optimizer.weight_decay=-1e-4"], "optimizer.weight_decay must be a finite number >= 0"),
    (["--config.label_smoothing=1.0"], "label_smoothing must be a finite number in [0, 1)"),
    (["--config.model_overrides.dropout_rate=1.0"], "dropout_rate (dropout after fc6 and fc7) must be a finite number in [0, 1)"),
    (["--config.schedule.warmup_steps=-1"], "schedule.warmup_steps must be an integer >= 0"),
    (["--config.input.std=(0.0,)"], "input.std must be positive"),
    (["--config.model=vgg17"], "unknown model 'vgg17'"),
    ("workdir-is-a-file", "is a file, not a directory"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    workdir = tmp_path / "w"
    if args == "workdir-is-a-file":
        workdir.write_text("not a directory")
        args = []
    code = train_cli.main(["train.py", f"--workdir={workdir}", *TINY, *args])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not compiled
    assert not workdir.exists() or workdir.is_file()


def test_ctrl_c_before_the_first_step_is_one_line_130(tmp_path, monkeypatch, capsys):
    def interrupted(config, workdir):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train_and_evaluate", interrupted)
    code = train_cli.main(["train.py", f"--workdir={tmp_path / 'w'}", *TINY])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 130 and len(err) == 1 and "interrupted (Ctrl-C)" in err[0]


@pytest.mark.parametrize("loss, gnorm, pnorm, good, bad, where", [
    (2.30, 0.17, math.nan, 7, ["parameter norm nan"], "the last good checkpoint is step 7 in"),
    (math.nan, math.inf, math.nan, 7, ["loss nan", "gradient norm inf", "parameter norm nan"],
     "the last good checkpoint is step 7 in"),
    (math.inf, 0.5, 3.0, None, ["loss inf"], "no checkpoint was saved before it"),
])
def test_divergence_message_names_the_real_values(loss, gnorm, pnorm, good, bad, where):
    metrics = {"loss": np.float32(loss), "grad_norm": np.float32(gnorm),
               "param_norm": np.float32(pnorm)}
    msg = str(loop._diverged(metrics, 8, good, Path("/runs/x/checkpoints")))
    assert "\n" not in msg and msg.startswith(", ".join(bad) + " not finite at step 8: stopped")
    reported = re.findall(r"(?:loss|gradient norm|parameter norm) (\S+?)[, ]", msg.split(" at step")[0] + " ")
    assert reported and not any(math.isfinite(float(v)) for v in reported)
    assert where in msg and "--config.learning_rate" in msg
