"""The README's main job, for real: ``python train/train.py`` with no arguments trains the digits
demo and must reach >= 97% test top-1. Budget: ~2 min on 2 idle cores (it prints its time)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_demo_reaches_target(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # as a user runs it: one CPU device
    t = time.time()
    p = subprocess.run([sys.executable, "train/train.py", "--workdir", str(tmp_path / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t
    assert p.returncode == 0, p.stderr[-3000:]
    final = [l for l in p.stdout.splitlines() if l.startswith("final:")]
    assert len(final) == 1, p.stdout[-2000:]
    top1 = float(re.search(r"test top-1 ([\d.]+)%", final[0]).group(1)) / 100
    print(f"\ndigits demo: {final[0]} (wall {wall:.0f} s)")
    assert top1 >= 0.97
    # progress bar with step, loss, img/s and an ETA; periodic evaluation lines
    assert re.search(r"\d+/500 \[[\d:]+<[\d:]+", p.stderr) and "img_s=" in p.stderr and "loss=" in p.stderr
    assert len(re.findall(r"step \d+: eval top-1", p.stdout)) == 5
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_top1" in r]
    assert evals[-1]["step"] == 500 and abs(evals[-1]["eval_top1"] - top1) < 1e-4
    assert (tmp_path / "run" / "curves.png").exists()
