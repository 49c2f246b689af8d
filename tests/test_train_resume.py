"""Resuming never destroys or hides work (issue 12): a workdir's checkpoints are only set aside
when they are damaged; a config that does not fit them, or that changes the run's meaning, is
refused with one line and every file left as it was; cadence keys change freely; errors that are
not about the checkpoint propagate. The digits recipe on a tiny VGG, in-process.
Budget: ~1.5 min on 2 shared cores (one 4-step run, shared; the refusals compile nothing)."""
import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train import compilation_cache, params_of, tiny  # noqa: F401  (module fixture)
from train import trainer
from train import train as train_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run (checkpoints at 2 and 4), copied by each test that touches it."""
    workdir = tmp_path_factory.mktemp("resume_src")
    result = trainer.train_and_evaluate(tiny("digits", total_steps=4), workdir)
    return workdir, params_of(result)


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def snapshot(workdir: Path) -> dict[str, str]:
    """Every file under the workdir -> a hash of its bytes (moves, rewrites and deletions show)."""
    return {str(p.relative_to(workdir)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def one_line_refusal(config, workdir, match):
    before = snapshot(workdir)
    with pytest.raises(trainer.ConfigError, match=match) as e:
        trainer.train_and_evaluate(config, workdir)
    assert "\n" not in str(e.value)
    assert snapshot(workdir) == before  # nothing moved, quarantined or rewritten
    assert not (workdir / "corrupt_checkpoints").exists()
    return str(e.value)


def test_checkpoint_of_another_model_is_refused_and_untouched(run):
    """hidden_size 16 -> 32 with the drift check waived: the checkpoint itself does not fit."""
    c = tiny("digits", total_steps=4, allow_config_change=True)
    c.model_overrides.hidden_size = 32
    msg = one_line_refusal(c, run, "hold another model")
    assert "params/fc7/kernel (16, 16) vs (32, 32)" in msg
    assert "use a new --workdir, or warm-start with --config.init_from" in msg


def test_checkpoint_of_another_optimizer_is_refused(run):
    c = tiny("digits", total_steps=4, allow_config_change=True)
    c.optimizer.name = "adamw"
    msg = one_line_refusal(c, run, "hold another optimizer state")
    assert "opt_state/" in msg


@pytest.mark.parametrize("change, keys", [
    ({"model_overrides.hidden_size": 32}, ["model_overrides.hidden_size"]),
    ({"model": "vgg13_bn"}, ["model"]),
    ({"seed": 1, "batch_size": 32}, ["batch_size", "seed"]),
    ({"optimizer.name": "adamw"}, ["optimizer.name"]),
    ({"schedule.name": "constant", "learning_rate": 0.1}, ["learning_rate", "schedule.name"]),
    ({"input.flip": True}, ["input.flip"]),
])
def test_config_drift_is_refused_with_the_differing_keys(run, change, keys):
    msg = one_line_refusal(tiny("digits", total_steps=4, **change), run, "another config")
    for k in keys:
        assert k in msg
    assert "--config.allow_config_change=True" in msg


def test_cli_refusal_is_one_line_exit_2(run, capsys):
    before = snapshot(run)
    code = train_cli.main(["train.py", f"--workdir={run}",
                           "--config.model_overrides.width=0.125",
                           "--config.model_overrides.hidden_size=32",
                           "--config.input.crop_size=32", "--config.input.resize_size=32",
                           "--config.input.scale_min=32", "--config.input.scale_max=40",
                           "--config.batch_size=16"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "model_overrides.hidden_size 16 -> 32" in err[0]
    assert snapshot(run) == before


def test_cadence_keys_change_freely(run, caplog):
    """total_steps 4 -> 6 and other cadences: resumes at 4, metrics of steps 1..4 are kept."""
    old_rows = (run / "metrics.jsonl").read_text().splitlines()
    c = tiny("digits", total_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
             log_every_steps=2, keep_checkpoints=2)
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        result = trainer.train_and_evaluate(c, run)
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    assert result["status"] == "done" and result["step"] == 6
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[:len(old_rows)] == old_rows
    assert [json.loads(r)["step"] for r in rows[len(old_rows):]] == [6, 6]  # log, eval
    saved = json.loads((run / trainer.CONFIG_FILE).read_text())
    assert saved["config"]["total_steps"] == 6
    assert set(saved["changes"][-1]["keys"]) >= {"total_steps", "eval_every_steps"}
    assert trainer.CADENCE_KEYS >= {"total_steps", "eval_every_steps", "checkpoint_every_steps"}


def test_allow_config_change_continues_and_records_it(run, trained):
    c = tiny("digits", total_steps=5, learning_rate=0.5, allow_config_change=True)
    result = trainer.train_and_evaluate(c, run)
    assert result["step"] == 5
    saved = json.loads((run / trainer.CONFIG_FILE).read_text())
    assert saved["config"]["learning_rate"] == 0.5
    assert saved["changes"][-1]["step"] == 4
    assert saved["changes"][-1]["keys"]["learning_rate"] == [0.05, 0.5]


def _damage(step_dir: Path, how: str) -> None:
    arrays = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
    assert arrays
    for f in arrays:
        if how == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif how == "half-written":
            f.unlink()
        else:
            f.write_bytes(b"\x00garbage")


@pytest.mark.parametrize("how", ["truncated", "half-written"])
def test_damaged_latest_step_falls_back(run, trained, how, caplog):
    """Truncated arrays, or a step whose array files never landed: step 2 is used and the run
    retrains to step 4 bit-identically; the damaged step is kept in corrupt_checkpoints/."""
    _damage(run / "checkpoints" / "4", how)
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        result = trainer.train_and_evaluate(tiny("digits", total_steps=4), run)
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert "at step 2" in caplog.text
    assert [p.name.split("-")[0] for p in (run / "corrupt_checkpoints").iterdir()] == ["4"]
    for a, b in zip(jax.tree.leaves(trained[1]), jax.tree.leaves(params_of(result))):
        np.testing.assert_array_equal(a, b)


def test_every_step_damaged_is_refused_not_restarted(run):
    for step in ("2", "4"):
        _damage(run / "checkpoints" / step, "garbage")
    msg = one_line_refusal(tiny("digits", total_steps=4), run, "every checkpoint in")
    assert "steps [2, 4]" in msg


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"),
    MemoryError("out of host memory"),
    ValueError("UNAVAILABLE: the storage server did not answer"),
])
def test_other_errors_propagate_and_touch_nothing(run, monkeypatch, error):
    def fail(self, *a, **k):
        raise error
    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    before = snapshot(run)
    with pytest.raises(type(error)) as e:
        trainer.train_and_evaluate(tiny("digits", total_steps=4), run)
    assert e.value is error
    assert snapshot(run) == before and not (run / "corrupt_checkpoints").exists()
