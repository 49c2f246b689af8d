"""benchmarks/input_pipeline.py end to end at its smallest size (a smoke test: no speed is
asserted; the figures live in benchmarks/results/input_pipeline.md). Budget: ~25 s (two worker
processes, each importing its framework)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/input_pipeline.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_input_pipeline_bench_smoke(tmp_path):
    out = tmp_path / "ip"
    run = _run("--images", "12", "--batch", "4", "--batches", "2", "--rounds", "1",
               "--size", "100x75", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["summary"]) == {"grain", "tf.data"}
    for impl, s in result["summary"].items():
        assert s["img_s_per_core"] > 0 and s["img_per_cpu_s"] > 0, impl
        [m] = result["runs"][impl]
        # 2 timed batches of 4 images after 2 warm-up batches, counted from the batches
        assert m["images"] == 8 and m["cpus"] and len(m["cpus"]) == 1  # pinned to one core
        assert m["last_batch_shape"] == [4, 224, 224, 3]  # the 224 crop of S >= 256
        assert m["cpu_seconds"] > 0 and m["load_before"] >= 0
    g, t = result["summary"]["grain"]["rounds"], result["summary"]["tf.data"]["rounds"]
    assert result["ratio"]["per_round"] == [g[0] / t[0]]
    assert result["ratio"]["median"] == g[0] / t[0]
    rows = result["accelerators"]["grain"]
    assert {r["accelerator"] for r in rows} >= {"A100 (SXM)", "TPU v4"}
    for r in rows:  # cores = derived step rate / measured rate
        assert abs(r["host_cores"] * result["summary"]["grain"]["img_s_per_core"]
                   - r["train_img_s"]) < 1e-6 * r["train_img_s"]
    md = out.with_suffix(".md").read_text()
    assert "| grain |" in md and "| tf.data |" in md and "host cores" in md
    assert f"median **{result['ratio']['median']:.2f}x**" in md


def test_odd_batches_round_up_to_even(tmp_path):
    """grain's two threads finish batches in pairs: an odd count would get one batch free."""
    out = tmp_path / "ip"
    run = _run("--images", "8", "--batch", "4", "--batches", "1", "--rounds", "1",
               "--size", "100x75", "--impls", "grain", "--out", str(out),
               "--data", str(tmp_path / "not" / "yet"))  # made when missing
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["args"]["batches"] == 2 and result["runs"]["grain"][0]["images"] == 8
    assert result["ratio"] is None  # one pipeline: no ratio


def test_input_pipeline_bench_bad_args(tmp_path):
    run = _run("--impls", "grain,dali", "--out", str(tmp_path / "x"), timeout=120)
    assert run.returncode == 2 and "unknown pipeline" in run.stderr
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "file").write_text("")
    run = _run("--data", str(tmp_path / "file" / "jpegs"), "--out", str(tmp_path / "x"), timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: --data ") and len(
        run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "x.json").exists()


def test_tfdata_window_is_grains_window():
    """The tf.data contender does grain's work, not less: its window (decoded from the source
    rectangle only) equals PIL's ``scale_jitter_crop`` of the full decode within one grey level
    (float vs fixed-point filter weights); a window 3 pixels off is far outside that."""
    import io
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from sklearn.datasets import load_sample_images
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import input_pipeline as bench
    from vgg_flax.images import resized_size, scale_jitter_crop
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for t, size in enumerate([(500, 375), (375, 500), (333, 500), (500, 375), (640, 427)]):
        buf = io.BytesIO()
        photos[t % 2].resize(size).save(buf, "JPEG", quality=95)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            im.load()
            s = int(rng.integers(256, 513))
            h, w = resized_size(im.height, im.width, s)
            top, left = int(rng.integers(0, h - 223)), int(rng.integers(0, w - 223))
            ref = np.asarray(scale_jitter_crop(im, s, top, left, 224)).astype(int)
        hw = tf.constant([size[1], size[0]])
        new = bench.tf_resized_size(hw, s)
        assert list(new.numpy()) == [h, w]
        got = bench.tf_window(tf.constant(buf.getvalue()), hw, new, tf.constant([top, left]))
        d = np.abs(np.round(got.numpy()).astype(int) - ref)
        assert d.max() <= 1, (size, s, top, left, d.max())
        off = bench.tf_window(tf.constant(buf.getvalue()), hw, new,
                              tf.constant([top, max(left - 3, 0) if left else 3]))
        assert np.abs(np.round(off.numpy()) - ref).max() > 20
