"""train/train.py and train/export.py as processes: exact resume after SIGKILL, SIGTERM, Ctrl-C at
any moment, a second trainer on a busy workdir, a 2-process localhost run (gloo) against a
1-process run, bad configuration, export; none of them prints our dependencies' warnings.
Budget: ~2.5 min on 2 shared cores (compiled programs are shared through a persistent cache)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train import trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.model_overrides.width=0.125", "--config.model_overrides.hidden_size=16",
        "--config.batch_size=16", "--config.eval_batch_size=40", "--config.log_every_steps=1",
        "--config.input.num_threads=1"]


@pytest.fixture(scope="module")
def env():
    # One device: these runs are about the process (signals, exit codes, resume), and their
    # programs then come from the run's persistent cache (tests/conftest.py), which cannot serve
    # multi-device programs holding oneDNN convolutions. Sharded resume is test_train's
    # (8 devices) and the two-process test's.
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return e


def train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train" / "train.py"), f"--workdir={workdir}", *TINY, *extra]


def run(cmd, env, timeout=300):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p


# Lines our dependencies print that a user can do nothing about (issue 26): absl's own, orbax's
# notes on the choices we make on purpose, huggingface_hub's retries.
NOISE = ("Logging before flag parsing", "Type handler registry", "No jax.Array in TypeHandler",
         "Given directory is read only", "CheckpointManagerOptions", "Retrying in")


def assert_quiet(stderr):
    """No warning of a dependency: neither absl's format (W1206 03:05:43.77 ...) nor logging's."""
    bad = [l for l in stderr.splitlines()
           if re.match(r"\s*(W\d{4} |WARNING)", l) or any(n in l for n in NOISE)]
    assert not bad, bad


def final_params(workdir):
    _, _, v, step = trainer.restore_variables(workdir)
    return jax.tree.map(np.asarray, v), step


def assert_same(a, b, atol=0.0):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        if atol:
            np.testing.assert_allclose(y, x, atol=atol, rtol=0, err_msg=str(path))
        else:
            np.testing.assert_array_equal(y, x, err_msg=str(path))


RESUME = ["--config.total_steps=40", "--config.checkpoint_every_steps=5",
          "--config.eval_every_steps=20"]


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    p = run(train_cmd(workdir, *RESUME), env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "final: step 40" in p.stdout
    assert_quiet(p.stderr)
    return final_params(workdir) + (workdir,)


def _wait_for_checkpoint(proc, ckpt_dir, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        done = [int(d.name) for d in ckpt_dir.glob("*") if d.name.isdigit()
                and (d / "_CHECKPOINT_METADATA").exists()]
        if done:
            return max(done)
        if proc.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def test_second_trainer_refused_and_sigkill_resumes_exactly(env, tmp_path, uninterrupted):
    """While a run holds its workdir, a second trainer there is refused in one line naming it
    (exit 2, nothing written); the lock dies with its holder: after SIGKILL the rerun resumes
    bit-identically."""
    ref, ref_step, _ = uninterrupted
    proc = subprocess.Popen(train_cmd(tmp_path, *RESUME), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_after = _wait_for_checkpoint(proc, tmp_path / "checkpoints")
    proc.send_signal(signal.SIGSTOP)  # holds its lock, writes nothing while the second one runs
    try:
        metrics = (tmp_path / "metrics.jsonl").read_bytes()
        second = run(train_cmd(tmp_path, *RESUME), env)
        assert second.returncode == 2, second.stderr[-2000:]
        err = [l for l in second.stderr.splitlines() if l.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} is in use by another "
                                                   f"trainer (pid {proc.pid} on host "), err
        assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert killed_after < 40
    p = run(train_cmd(tmp_path, *RESUME), env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr
    assert_quiet(p.stderr)
    got, step = final_params(tmp_path)
    assert step == ref_step == 40
    assert_same(ref, got)  # bit-identical


def test_sigterm_checkpoints_and_exits_cleanly(env, tmp_path, uninterrupted):
    """A preempted run (SIGTERM) checkpoints and exits 0; its restart resumes to the same
    parameters without compiling its training step: the run's own persistent cache
    (DIR/xla_cache, as without JAX_COMPILATION_CACHE_DIR) serves it."""
    env = {k: v for k, v in env.items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                     "VGG_FLAX_CACHE")}
    proc = subprocess.Popen(train_cmd(tmp_path, *RESUME), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(proc, tmp_path / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    line = next(l for l in out.splitlines() if l.startswith("stopped by SIGTERM at step"))
    stopped = int(line.split("at step ")[1].split(";")[0])
    assert 0 < stopped < 40
    assert (tmp_path / "checkpoints" / str(stopped) / "_CHECKPOINT_METADATA").exists()
    cache = tmp_path / "xla_cache"
    assert f"compilation cache {cache}: 0 program(s) read from it" in err
    stored = {p.name for p in cache.iterdir()}
    # and the rerun finishes where the uninterrupted run did, its step read from the cache
    p = run(train_cmd(tmp_path, *RESUME), env)
    assert p.returncode == 0, p.stderr[-2000:]
    first = re.search(rf"first step .* compilation cache {cache}: (\d+) program\(s\) read from "
                      r"it, (\d+) looked up and compiled", p.stderr)
    assert first and int(first.group(1)) >= 1 and first.group(2) == "0", p.stderr[-2000:]
    assert stored <= {p.name for p in cache.iterdir()}
    assert_same(uninterrupted[0], final_params(tmp_path)[0])


def test_ctrl_c_checkpoints_and_exits_130(env, tmp_path):
    """SIGINT (Ctrl-C) saves like SIGTERM, then one line and exit 130, no traceback."""
    proc = subprocess.Popen(train_cmd(tmp_path, *RESUME), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(proc, tmp_path / "checkpoints")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(l for l in out.splitlines() if l.startswith("stopped by SIGINT (Ctrl-C) at step"))
    stopped = int(line.split("at step ")[1].split(";")[0])
    assert 0 < stopped < 40 and "rerun the same command to resume" in line
    assert (tmp_path / "checkpoints" / str(stopped) / "_CHECKPOINT_METADATA").exists()
    assert final_params(tmp_path)[1] == stopped


def _wait_for(predicate, proc, timeout=240):
    t = time.time()
    while not predicate():
        if proc.poll() is not None or time.time() - t > timeout:
            return False
        time.sleep(0.01)
    return True


def test_ctrl_c_at_any_moment_exits_cleanly(env, tmp_path):
    """Ctrl-C while importing, while preparing and compiling the init (before the loop: one line,
    nothing saved), while the first step compiles (the loop: that step ends, a checkpoint, one
    line) and twice in the loop (at once, nothing saved): exit 130 every time, no traceback, no
    segfault. (Python's KeyboardInterrupt landed in JAX's GC callback, printed and swallowed, or
    unwound into a teardown that segfaulted with XLA's threads running; issue 26.)"""
    procs = {}
    for case in ("importing", "init", "first step", "twice"):
        work = tmp_path / case.replace(" ", "_")
        out = open(tmp_path / f"{work.name}.out", "w+")
        err = open(tmp_path / f"{work.name}.err", "w+")
        procs[case] = (subprocess.Popen(train_cmd(work, *RESUME), env=env, cwd=ROOT,
                                        stdout=out, stderr=err), work, out, err)
    time.sleep(1.0)  # the imports take seconds
    procs["importing"][0].send_signal(signal.SIGINT)
    started = lambda: "vgg_flax train:" in (tmp_path / "init.out").read_text()  # noqa: E731
    if _wait_for(started, procs["init"][0]):
        procs["init"][0].send_signal(signal.SIGINT)
    for case in ("first step", "twice"):  # the config is written just before the init compiles
        proc, work = procs[case][:2]
        if _wait_for(lambda: (work / "train_config.json").exists(), proc):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            if case == "twice":
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
    for case, (proc, work, out, err) in procs.items():
        proc.wait(timeout=240)
        with out, err:
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        assert proc.returncode == 130, (case, proc.returncode, stderr[-3000:])
        for bad in ("Traceback", "KeyboardInterrupt", "Exception ignored", "Fatal Python error"):
            assert bad not in stderr, (case, stderr[-3000:])
        stopped = [l for l in stdout.splitlines() if l.startswith("stopped by SIGINT (Ctrl-C)")]
        interrupted = [l for l in stderr.splitlines() if l.startswith("interrupted (Ctrl-C)")]
        assert len(stopped) + len(interrupted) == 1, (case, stdout, stderr[-3000:])
        if stopped:  # it saved the step it stopped at
            step = int(stopped[0].split("at step ")[1].split(";")[0])
            assert (work / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()
        if case == "importing":
            assert interrupted == ["interrupted (Ctrl-C) while starting; nothing was saved"]
        if case in ("init", "twice"):
            assert interrupted and str(work / "checkpoints") in interrupted[0], (case, stderr)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TWO_PROCESS_ARGS = {"total_steps": 3, "checkpoint_every_steps": 3, "eval_every_steps": 3,
                    "mesh.data": 4, "schedule.name": "constant", "schedule.warmup_steps": 0}


def tiny_config(**overrides):
    """The config the CLI builds from TINY and ``--config.KEY=VALUE`` for ``overrides``."""
    from test_train import set_keys
    c = trainer.load_config(ROOT / "train" / "configs" / "digits.py")
    c.model_overrides.update(width=0.125, hidden_size=16)
    c.update(batch_size=16, eval_batch_size=40, log_every_steps=1)
    c.input.num_threads = 1
    return set_keys(c, **overrides)


def test_two_processes_equal_one_process_four_devices(env, tmp_path):
    """2 processes x 2 devices (gloo collectives) vs 1 process x 4 devices (this one: the
    process boundary is the point of the former only), BatchNorm and dropout on, 3 steps at the
    full learning rate (constant, no warmup). Tolerance per leaf: 1e-6 absolute (the
    all-reduces sum in another order) and 1% of that leaf's own update, so a process that
    skipped any leaf's update fails (see test_train.assert_equivalent)."""
    args = [f"--config.{k}={v}" for k, v in TWO_PROCESS_ARGS.items()]
    port = _free_port()
    two_devices = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(
        train_cmd(tmp_path / "two", *args, f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}"),
        env=two_devices, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0] and "final: step 3" in outs[0][0]
    # only process 0 prints, logs and plots (gloo's own C++ connection lines aside: its
    # threads can split one "[Gloo] Rank 1 is connected to 3 peer ranks. ..." over two lines)
    ours = [l for l in outs[1][0].splitlines()
            if l.strip() and not l.startswith("[Gloo]") and "peer ranks" not in l]
    assert ours == [], ours
    config = tiny_config(**TWO_PROCESS_ARGS)
    assert len(jax.devices()) >= 4  # tests/conftest.py: 8 CPU devices, the mesh takes 4
    one = trainer.train_and_evaluate(config, tmp_path / "one")
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
    a, _ = final_params(tmp_path / "one")
    b, _ = final_params(tmp_path / "two")
    diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(f"\n2 processes vs 1 process: max |param diff| after 3 steps = {diff:.2e}")
    from test_train import BN_FROZEN, assert_equivalent
    init = initial_params(config, tmp_path / "init")
    assert_equivalent({"params": a["params"]}, {"params": b["params"]}, init, 1e-6,
                      "2 processes vs 1 process", frozen=BN_FROZEN)
    assert_same(a, b, atol=1e-6)  # batch statistics too
    final = next(l for l in outs[0][0].splitlines() if l.startswith("final:")).split(",")[1]
    assert final == f" {config.eval_split} top-1 {one['eval_top1']:.2%}"  # same eval top-1


def initial_params(config, workdir):
    """The parameters a run of ``config`` starts from (its seed, initialised as the trainer does)."""
    from test_train import run_steps
    return {"params": run_steps(config, 0, workdir)[0]}


def test_nan_loss_exits_3_in_one_line(env, tmp_path):
    """A learning rate that blows the weights up: the CLI stops at the first non-finite step
    with exit 3 and one error line (its wording is the trainer's, tested in test_train)."""
    p = run(train_cmd(tmp_path / "w", "--config.learning_rate=1e12",
                      "--config.schedule.name=constant", "--config.schedule.warmup_steps=0",
                      "--config.total_steps=20", "--config.checkpoint_every_steps=1",
                      "--config.eval_every_steps=100"), env)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not finite" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config.model=vgg17", "unknown model 'vgg17'"),
    ("--config.dataset=imagenet2012", "--config.manual_dir"),
    ("--config.mesh.data=3", "does not fit the 1 available device"),
])
def test_bad_config_is_one_line_and_nonzero(env, tmp_path, flag, message):
    p = run(train_cmd(tmp_path / "w", flag, "--config.data_dir=" + str(tmp_path / "tfds"),
                      "--config.input.crop_size=32", "--config.input.scale_min=32",
                      "--config.input.resize_size=32"), env)
    assert p.returncode == 2
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and message in err[0], p.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_export_cli(env, tmp_path, uninterrupted):
    work = uninterrupted[2]
    cmd = [sys.executable, str(ROOT / "train" / "export.py"), "--workdir", str(work),
           "--out", str(tmp_path / "out")]
    p = run(cmd, env)
    assert p.returncode == 0 and "exported vgg11_bn step 40" in p.stdout, p.stderr[-2000:]
    assert p.stderr == ""  # not even orbax's read-only and type-registry notes
    import vgg_flax
    module, variables = vgg_flax.load(tmp_path / "out")
    assert_same(final_params(work)[0]["params"], variables["params"])
    p = run(cmd, env)
    assert p.returncode == 2 and "exists" in p.stderr
