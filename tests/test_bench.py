"""The benchmark runs end to end at its smallest size (a smoke test: no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    """A 1/8-width VGG-11 at 32x32, one round: every row is there and the user's row first."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench.py"), "--model", "vgg11", "--batch", "1",
           "--size", "32", "32", "--width", "0.125", "--reps", "1", "--warmup", "0",
           "--json", str(out), "--md", str(tmp_path / "bench.md")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, installed or not
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    seen = {(r["framework"], r["mode"], r["dtype"]) for r in rows}
    assert seen == {(f, m, d) for f in ("torchvision", "vgg_flax") for m in ("infer", "train")
                    for d in ("fp32", "bf16")}
    for r in rows:
        assert r["img_s"] > 0 and r["gflop_s"] > 0 and r["ratio_vs_torch_best"] > 0
        assert 0 < r["frac_of_peak"]  # against a peak measured in the same rounds
    assert [r["config"] for r in rows if r["framework"] == "vgg_flax"] == [
        "vgg_flax (plain jax.jit)"] * 4
    assert "| vgg11 | train | bf16 | 1 | vgg_flax (plain jax.jit) |" in (
        tmp_path / "bench.md").read_text()
    # the library tuned the allocator itself, in this ordinary process
    assert result["machine"]["host_malloc"] == "tuned"


def test_layers_smoke(tmp_path):
    out = tmp_path / "layers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/layers.py"), "--batch", "1", "--size", "32",
           "--reps", "1", "--json", str(out), "--md", str(tmp_path / "layers.md")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VGG_FLAX_MALLOC": "default"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"fp32", "bf16"}
    for r in rows["fp32"] + rows["bf16"]:
        assert all(v > 0 for k, v in r.items() if k not in ("layer", "count")), r
    assert len(rows["fp32"]) == 9 + 5  # VGG-16's distinct convolution shapes and its five pools
    bad = subprocess.run([*cmd[:2], "--size", "100"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert bad.returncode == 2 and "--size must be a multiple of 32" in bad.stderr


HOST_MALLOC_PROBE = """
import resource, sys
import numpy as np
import jax, jax.numpy as jnp
import vgg_flax
from vgg_flax import perf
model = vgg_flax.create("vgg11", width=1 / 8, hidden_size=8, num_classes=2, pool_size=(1, 1))
jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))  # first use: traces
def faults_of_a_fresh_256mb_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(1 << 26, np.float32)
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_256mb_block()
print(perf.tune_host_malloc(), faults_of_a_fresh_256mb_block())
"""


def test_host_allocator_tuned_at_first_use():
    """Tracing a VGG applies the glibc settings in-process (no restart): a large block freed
    and allocated again is served from the heap without page faults; VGG_FLAX_MALLOC=default
    opts out (a fresh mmap each time: one fault per page)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "VGG_FLAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    runs = {}
    for opt in ("", "default"):
        run = subprocess.run([sys.executable, "-c", HOST_MALLOC_PROBE], capture_output=True,
                             text=True, env={**env, "VGG_FLAX_MALLOC": opt}, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        runs[opt] = run.stdout.rsplit(maxsplit=1)
    # 256 MiB faults in as 65536 4-KiB pages, or 128 2-MiB ones with transparent huge pages
    assert runs[""][0] == "tuned" and int(runs[""][1]) < 16, runs
    assert runs["default"][0].startswith("default") and int(runs["default"][1]) >= 128, runs
