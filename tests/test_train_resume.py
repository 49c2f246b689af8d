"""Resuming never destroys or hides work (issue 12): a workdir's checkpoints are only set aside
when they are damaged; a config that does not fit them, or that changes the run's meaning, is
refused with one line and every file left as it was; cadence keys change freely; errors that are
not about the checkpoint propagate. The digits recipe on a tiny VGG, in-process.
Budget: ~1 min on 2 cores (one shared 4-step run, one resumed step; refusals compile nothing)."""
import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

import test_train
from train import rundir, trainer
from train import train as train_cli

ROOT = Path(__file__).resolve().parents[1]


def tiny(name, **kw):
    """test_train's tiny recipe on one device: these runs are about the checkpoints, and their
    programs are then served from the run's persistent compilation cache on each resume."""
    return test_train.tiny(name, **{**test_train.ONE_DEVICE, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run (checkpoints at 2 and 4), copied by each test that touches it. The
    same program as test_train.py's run, so a session compiles it once (persistent cache)."""
    workdir = tmp_path_factory.mktemp("resume_src")
    result = trainer.train_and_evaluate(tiny("digits", total_steps=4), workdir)
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def snapshot(workdir: Path) -> dict[str, str]:
    """Every file under the workdir -> a hash of its bytes (moves, rewrites and deletions show),
    but the lock, which names whichever run opened the workdir last."""
    return {str(p.relative_to(workdir)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


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
    """Every cadence key may change; a run stopped at step 2 resumes under new cadences and keeps
    its metrics up to step 2 (same program: total_steps, which shapes the cosine, is kept here)."""
    changed = tiny("digits", total_steps=8, eval_every_steps=3, checkpoint_every_steps=3,
                   log_every_steps=2, keep_checkpoints=1)
    changes = trainer.check_drift(trainer.resolved(changed), run)
    assert set(changes) == {"total_steps", "eval_every_steps", "checkpoint_every_steps",
                            "log_every_steps", "keep_checkpoints"} <= trainer.CADENCE_KEYS
    shutil.rmtree(run / "checkpoints" / "4")  # stopped at step 2
    old_rows = [r for r in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(r)["step"] <= 2]
    c = tiny("digits", total_steps=4, eval_every_steps=3, checkpoint_every_steps=3,
             log_every_steps=2, keep_checkpoints=1)
    with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
        result = trainer.train_and_evaluate(c, run)
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert result["status"] == "done" and result["step"] == 4
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[:len(old_rows)] == old_rows
    new = [json.loads(r) for r in rows[len(old_rows):]]
    assert [(r["step"], "eval_top1" in r) for r in new] == [(3, True), (4, False), (4, True)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    saved = json.loads((run / trainer.CONFIG_FILE).read_text())
    assert saved["config"]["eval_every_steps"] == 3
    assert set(saved["changes"][-1]["keys"]) == {"eval_every_steps", "checkpoint_every_steps",
                                                 "log_every_steps", "keep_checkpoints"}


def test_allow_config_change_continues_and_records_it(run):
    c = tiny("digits", total_steps=4, learning_rate=0.5, allow_config_change=True)
    result = trainer.train_and_evaluate(c, run)  # resumed at the end: evaluates, trains nothing
    assert result["status"] == "done" and result["step"] == 4
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


@pytest.mark.parametrize("how", ["truncated", "half-written", "garbage"])
def test_damaged_latest_step_falls_back(run, how, caplog):
    """Truncated arrays, a step whose array files never landed, or garbage bytes: the resume
    policy itself (no compilation) warns, returns step 2 with its data-iterator position and
    keeps the damaged step in corrupt_checkpoints/. (test_train.py retrains such a run to the
    same parameters.)"""
    _damage(run / "checkpoints" / "4", how)
    setup, train_src, _ = trainer.prepare(tiny("digits", total_steps=4), run)
    train_iter = iter(trainer.input_pipeline.train_dataset(setup.config, train_src, 0, 1))
    mngr = trainer.checkpoint_manager(run, setup.config)
    try:
        with caplog.at_level(logging.INFO, logger="vgg_flax.train"):
            step, state, meta = trainer.restore_latest(mngr, run, setup.abstract_sharded,
                                                       train_iter)
    finally:
        mngr.close()
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert step == 2 and meta["step"] == 2 and int(state["step"]) == 2
    assert [p.name.split("-")[0] for p in (run / "corrupt_checkpoints").iterdir()] == ["4"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


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


def test_export_of_a_damaged_step_is_one_line(run, tmp_path):
    _damage(run / "checkpoints" / "4", "truncated")
    before = snapshot(run)
    with pytest.raises(trainer.ConfigError, match="checkpoint step 4 in .* is damaged") as e:
        trainer.export(run, tmp_path / "out", step=4)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert snapshot(run) == before
