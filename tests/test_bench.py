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
