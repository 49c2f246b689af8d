"""The benchmark runs end to end at its smallest size (a smoke test: no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench.py"), "--model", "vgg11", "--batch", "1",
           "--size", "32", "32", "--reps", "1", "--warmup", "0",
           "--json", str(out), "--md", str(tmp_path / "bench.md")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, installed or not
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["framework"], r["mode"], r["dtype"]) for r in rows}
    assert seen == {(f, m, d) for f in ("torchvision", "vgg_flax") for m in ("infer", "train")
                    for d in ("fp32", "bf16")}
    for r in rows:
        assert r["img_s"] > 0 and r["gflop_s"] > 0 and r["ratio_vs_torch_best"] > 0
    assert "| vgg11 | train | bf16 | 1 |" in (tmp_path / "bench.md").read_text()
    # the benchmark restarted itself with the host allocator settings and says so
    assert json.loads(out.read_text())["machine"]["host_malloc"] == "tuned"


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


def test_exec_with_tuned_host_malloc_restarts_once(tmp_path):
    """The CLIs' restart keeps the command line and sets glibc's settings; opt-out respected."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nfrom vgg_flax import perf\n"
                      "print('start', os.getpid(), flush=True)\n"
                      "perf.exec_with_tuned_host_malloc()\n"
                      "print('args', sys.argv[1:], perf.host_malloc_tuned(), os.getpid())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "VGG_FLAX_MALLOC"):
        env.pop(k, None)
    run = subprocess.run([sys.executable, str(script), "a", "--b"], capture_output=True,
                         text=True, env=env, timeout=120)
    lines = run.stdout.split("\n")
    assert run.returncode == 0, run.stderr[-2000:]
    pid = lines[0].split()[1]
    assert lines[1] == f"start {pid}" and lines[2] == f"args ['a', '--b'] True {pid}", lines
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**env, "VGG_FLAX_MALLOC": "default"}, timeout=120)
    assert run.stdout.count("start") == 1 and "args [] False" in run.stdout
