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
           "--size", "32", "32", "--width", "0.125", "--reps", "1", "--warmup", "0", "--peak-size", "256",
           "--json", str(out), "--md", str(tmp_path / "bench.md")]
    env = {k: v for k, v in os.environ.items() if k != "VGG_FLAX_MALLOC"}  # as a user runs it
    env["PYTHONPATH"] = str(ROOT)  # this checkout, installed or not
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
import os, resource
import jax, jax.numpy as jnp
if os.environ.get("JAX_FIRST"):
    jnp.ones(3).block_until_ready()  # JAX's backend (and XLA's worker threads) started first
import vgg_flax
x = jnp.ones((1 << 25,), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x)[::-1]).sum())  # a 128 MiB temporary, a scalar out
def faults_of_one_execution():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# glibc settles where the blocks go within a few executions: the steady state is the last five
print(vgg_flax.HOST_MALLOC.split(" (")[0], min([faults_of_one_execution() for _ in range(10)][5:]))
"""


def test_host_allocator_tuned_at_import():
    """``import vgg_flax`` applies the glibc settings in-process (no restart), before XLA's
    worker threads exist: a compiled program's large temporaries are then served from the heap
    again on each execution, without page faults. Imported after JAX ran something, the worker
    threads keep glibc's defaults (and the status says "tuned late"); VGG_FLAX_MALLOC=default
    opts out. Both of those fault the temporary in again every time (one fault per page).
    Fewest faults of executions 6-10 (the first few settle where glibc puts the blocks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "VGG_FLAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    runs = {}
    for case, extra in (("import first", {}), ("jax first", {"JAX_FIRST": "1"}),
                        ("opt-out", {"VGG_FLAX_MALLOC": "default"})):
        run = subprocess.run([sys.executable, "-c", HOST_MALLOC_PROBE], capture_output=True,
                             text=True, env={**env, **extra}, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        status, faults = run.stdout.rsplit(maxsplit=1)
        runs[case] = status, int(faults)
    # 128 MiB faults in as 32768 4-KiB pages, or 64 2-MiB ones with transparent huge pages
    assert runs["import first"][0] == "tuned" and runs["import first"][1] < 16, runs
    assert runs["jax first"][0] == "tuned late" and runs["jax first"][1] >= 64, runs
    assert runs["opt-out"][0] == "default" and runs["opt-out"][1] >= 64, runs
