"""Can the host feed an accelerator? Images/s per CPU core of the ImageNet training transform.

    python benchmarks/input_pipeline.py --images 768 --rounds 5 --cores 1

The transform is the paper's (section 3.1): JPEG decode, isotropic rescale of the shorter side to
S ~ U{256..512}, random 224x224 crop, horizontal flip with probability 1/2, AlexNet's PCA colour
shift, uint8 batches. It runs on generated ImageNet-like JPEGs (500x375 or 375x500, about 110 KB
at quality 95: scikit-learn's two sample photos, randomly cropped, resized, mirrored and
noised), laid out as an ImageFolder tree, through two pipelines doing the same work:

- ``grain``: ours, ``train/input_pipeline.train_dataset`` on ``dataset=folder``, exactly what
  ``train/train.py`` runs (PIL decode with the accurate integer DCT, only the 224 window
  resampled with PIL's antialiased bilinear filter, LUT colour shift, grain threads);
- ``tf.data``: the same work written the idiomatic tf.data way (``decode_and_crop_jpeg`` of
  the window's source rectangle with ``dct_method="INTEGER_ACCURATE"``, that rectangle resized
  to 224 with ``antialias=True``, ``random_flip_left_right``, the colour shift in float; map
  with ``AUTOTUNE`` parallelism, batch, prefetch).

torchvision's ``DataLoader`` is not a row: its stock transforms resize the whole image
(``RandomShortestSize``) and decode all of it, which is other work, and a same-work version
would be this repository's PIL transform in another loader.

Each measurement is a fresh worker process pinned to ``--cores`` CPUs (``sched_setaffinity``),
so "per core" is literal; the pipelines alternate within each of ``--rounds`` rounds (the
machine may be shared: interleaving puts both under the same load) and the median round is
reported, with grain / tf.data within each round and its median. A worker times an even number
of batches after two warm-up batches and counts the images it received; it records its CPU
seconds too (``cpu_seconds``: on a loaded machine, the figure that other jobs do not inflate).

Then: host cores one accelerator needs for VGG-16 training at a derived step rate:
VGG-16 forward at 224 is 15.47 G multiply-adds (torchvision's meta) = 30.9 GFLOP; a training
step is ~3x the forward (forward, input gradient, weight gradient) = 92.8 GFLOP per image; an
accelerator at ``--mfu`` (default 40%) of its dense bf16 peak trains peak * mfu / 92.8e9 images/s;
divided by the measured images/s per core.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("grain", "tf.data")
VGG16_GMACS = 15.47  # torchvision VGG16_Weights.IMAGENET1K_V1.meta["_ops"], one MAC = one op
# Dense bf16 peak FLOP/s from the vendors' data sheets.
ACCELERATORS = {"TPU v5e": 197e12, "A100 (SXM)": 312e12, "TPU v4": 275e12, "H100 (SXM)": 989e12}
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


# -- data -------------------------------------------------------------------------------------
def make_images(root: Path, n: int, classes: int = 10, size=(500, 375), quality: int = 95,
                noise: float = 8.0, seed: int = 0) -> dict:
    """``n`` JPEGs in root/train/<class>/, each a random crop of a sample photo resized to
    ``size`` (a quarter portrait), mirrored at random, plus Gaussian noise (sensor grain: it
    brings the file size to ImageNet's ~110 KB). Returns their size statistics."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    sizes = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = (size if rng.random() < 0.75 else size[::-1])
        frac = rng.uniform(0.5, 1.0)
        cw = int(im.width * frac)
        ch = min(im.height, int(cw * h / w))
        left, top = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        a = np.asarray(im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch)),
                       np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)
        d = root / "train" / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=quality)
        (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()))
    return {"images": n, "mean_kb": sum(sizes) / n / 1e3, "min_kb": min(sizes) / 1e3,
            "max_kb": max(sizes) / 1e3, "width_x_height": f"{size[0]}x{size[1]} (1/4 portrait)",
            "quality": quality}


def files(root: Path) -> tuple[list[str], list[int]]:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    paths, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / "train" / c).iterdir()):
            paths.append(str(f))
            labels.append(k)
    return paths, labels


# -- workers (one process each, pinned) --------------------------------------------------------
def _time_batches(it, batches: int, batch: int, warmup: int = 2) -> dict:
    """Images/s over ``batches`` (even) batches after ``warmup`` (even) ones. Even counts: with
    two reader threads grain finishes batches in pairs, so an odd count after an odd warm-up
    gets one batch free. Images are counted from the batches themselves. CPU seconds (every
    thread of the process) are recorded too: on a shared machine they count only this
    process's work, where wall time also counts the other jobs' turns on the pinned core."""
    for _ in range(warmup):  # threads started, files cached, buffers in steady state
        next(it)
    images = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        b = next(it)
        images += len(b[0])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": images, "seconds": dt, "cpu_seconds": cpu,
            "last_batch_shape": list(b[0].shape)}


def worker_grain(root: Path, batch: int, batches: int, cores: int, threads: int, draft: bool):
    from train import input_pipeline
    from train.configs.base import base
    c = base()
    c.dataset, c.data_dir, c.train_split = "folder", str(root), "train"
    c.input.update(train_kind="scale_jitter", scale_min=256, scale_max=512, crop_size=224,
                   flip=True, colour_shift=0.1, num_threads=threads, draft=draft)
    c.batch_size = batch
    src = input_pipeline.get_source(c, "train")
    it = iter(input_pipeline.train_dataset(c, src, 0, 1))
    return _time_batches(((b["image"], b["label"]) for b in it), batches, batch)


def tf_resized_size(hw, s):
    """torchvision's size rule in TF: shorter side ``s``, the longer one truncated."""
    import tensorflow as tf
    short = tf.minimum(hw[0], hw[1])
    new = tf.cast(tf.cast(hw, tf.float32) * tf.cast(s, tf.float32) / tf.cast(short, tf.float32), tf.int32)
    return tf.where(hw == short, s, new)


def tf_window(data, hw, new, off, crop: int = 224):
    """The (crop, crop) window at ``off`` of the JPEG ``data`` (size ``hw``) resized to ``new``,
    as float32, with PIL's geometry: only the window's source rectangle plus the filter's reach
    is decoded (accurate integer DCT), and resampled with the triangle filter widened by the
    downscale factor (``antialias=True``: PIL's BILINEAR), sampling at the pixel centres of
    the whole image resized to ``new`` (the translation puts the rectangle where it lies)."""
    import tensorflow as tf
    f = tf.cast(new, tf.float32) / tf.cast(hw, tf.float32)  # output pixels per source pixel
    reach = tf.cast(tf.math.ceil(1.0 / tf.reduce_min(f)), tf.int32) + 2  # filter support
    lo = tf.maximum(0, tf.cast(tf.floor(tf.cast(off, tf.float32) / f), tf.int32) - reach)
    hi = tf.minimum(hw, tf.cast(tf.math.ceil(tf.cast(off + crop, tf.float32) / f), tf.int32) + reach)
    img = tf.io.decode_and_crop_jpeg(data, tf.concat([lo, hi - lo], 0), channels=3,
                                     dct_method="INTEGER_ACCURATE")
    # tf.image.resize(antialias=True) is this op without the translation
    return tf.raw_ops.ScaleAndTranslate(
        images=img[None], size=[crop, crop], scale=f,
        translation=tf.cast(lo, tf.float32) * f - tf.cast(off, tf.float32),
        kernel_type="triangle", antialias=True)[0]


def worker_tfdata(root: Path, batch: int, batches: int, cores: int, threads: int, draft: bool):
    """The same work as ``grain`` the idiomatic tf.data way: read the JPEG's shape, draw S and
    the window, decode and resample only the window (``tf_window``: libjpeg-turbo skips the
    rows above it, stops after its last row and does not convert the columns beside it), flip,
    colour shift in float; map with AUTOTUNE parallelism, batch, prefetch."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    paths, labels = files(root)
    vec = tf.constant(PCA_EIGVEC, tf.float32)
    val = tf.constant(PCA_EIGVAL, tf.float32)

    def load(path, label):
        data = tf.io.read_file(path)
        hw = tf.io.extract_jpeg_shape(data)[:2]
        s = tf.random.uniform([], 256, 513, tf.int32)
        new = tf_resized_size(hw, s)
        off = tf.cast(tf.random.uniform([2], 0.0, 1.0) * tf.cast(new - 223, tf.float32), tf.int32)
        img = tf_window(data, hw, new, off)
        img = tf.image.random_flip_left_right(img)
        alpha = tf.random.normal([3], stddev=0.1)
        shift = 255.0 * tf.linalg.matvec(vec, alpha * val)
        img = tf.cast(tf.clip_by_value(tf.round(img + shift), 0, 255), tf.uint8)
        return img, label

    ds = (tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=0)
          .repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(opts)
    return _time_batches(((x.numpy(), y.numpy()) for x, y in ds), batches, batch)


WORKERS = {"grain": worker_grain, "tf.data": worker_tfdata}


def run_worker(args) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:args.cores]
    os.sched_setaffinity(0, cpus)  # before any library starts its threads
    r = WORKERS[args.worker](Path(args.root), args.batch, args.batches, args.cores,
                             args.threads, args.draft)
    r["cpus"] = cpus
    print("RESULT " + json.dumps(r), flush=True)


# -- driver -----------------------------------------------------------------------------------
def measure(impl: str, args, root: Path) -> dict:
    threads = args.threads or 2 * args.cores
    cmd = [sys.executable, __file__, "--worker", impl, "--root", str(root), "--batch",
           str(args.batch), "--batches", str(args.batches), "--cores", str(args.cores),
           "--threads", str(threads)] + (["--draft"] if args.draft else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{impl} worker failed ({p.returncode}): {p.stderr[-2000:]}")
    r = json.loads(line[7:])
    r["img_s"] = r["images"] / r["seconds"]
    r["img_s_per_core"] = r["img_s"] / args.cores
    r["img_per_cpu_s"] = r["images"] / r["cpu_seconds"]
    r["threads"] = threads
    r["load_before"] = load  # 1-minute load average as the run started
    return r


def accelerator_needs(per_core: float, mfu: float) -> list[dict]:
    flop = 3 * 2 * VGG16_GMACS * 1e9
    rows = []
    for name, peak in ACCELERATORS.items():
        rate = peak * mfu / flop
        rows.append({"accelerator": name, "peak_bf16_tflops": peak / 1e12, "mfu": mfu,
                     "train_img_s": rate, "host_cores": rate / per_core})
    return rows


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict | None]:
    """Per pipeline: the median and every round's images/s per core. And grain / tf.data within
    each round (adjacent runs, so closer in machine load than the two medians) with its median."""
    summary = {impl: {"img_s_per_core": statistics.median(m["img_s_per_core"] for m in ms),
                      "rounds": [m["img_s_per_core"] for m in ms], "threads": ms[0]["threads"],
                      "img_per_cpu_s": statistics.median(m["img_per_cpu_s"] for m in ms)}
               for impl, ms in runs.items()}
    if not {"grain", "tf.data"} <= set(summary):
        return summary, None
    per_round = [g / t for g, t in zip(summary["grain"]["rounds"], summary["tf.data"]["rounds"])]
    return summary, {"per_round": per_round, "median": statistics.median(per_round)}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Input pipeline: ImageNet training transform, images/s per host core",
             "",
             f"`{result['command']}`",
             "",
             f"{a['images']} generated JPEGs ({result['data']['width_x_height']}, mean "
             f"{result['data']['mean_kb']:.0f} KB, quality {result['data']['quality']}); decode "
             "(accurate DCT), S ~ U{256..512} rescale of the 224 window only, flip, PCA colour "
             f"shift; batch {a['batch']}, {a['batches']} timed batches per run after 2 warm-up "
             f"batches; each run a fresh process pinned to {a['cores']} core(s); {a['rounds']} "
             f"interleaved rounds, median. Machine: {result['machine']}.",
             "",
             "| pipeline | images/s per core (median) | rounds | vs tf.data | images per CPU-second |",
             "|---|---|---|---|---|"]
    ref = result["summary"].get("tf.data", {}).get("img_s_per_core")
    for impl, s in result["summary"].items():
        rounds = ", ".join(f"{x:.0f}" for x in s["rounds"])
        rel = f"{s['img_s_per_core'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {impl} | {s['img_s_per_core']:.0f} | {rounds} | {rel} | "
                     f"{s['img_per_cpu_s']:.0f} |")
    if result.get("ratio"):
        r = result["ratio"]
        lines += ["", "grain / tf.data within each round: "
                  + ", ".join(f"{x:.2f}x" for x in r["per_round"])
                  + f"; median **{r['median']:.2f}x**."]
    loads = ", ".join(f"{m['load_before']:.1f}" for ms in result["runs"].values() for m in ms)
    lines += ["", f"1-minute load average as each run started: {loads} on {os.cpu_count()} CPUs "
              "(other jobs slow both pipelines; on a loaded machine read the per-round ratios)."]
    lines += ["", f"Host cores per accelerator for VGG-16 training (derived: 3 x 2 x "
              f"{VGG16_GMACS} GFLOP per image at {100 * a['mfu']:.0f}% of dense bf16 peak, divided "
              "by the measured images/s per core):",
              "", "| accelerator | peak TFLOP/s | VGG-16 train img/s | host cores (grain) |"
              " host cores (tf.data) |", "|---|---|---|---|---|"]
    acc = result["accelerators"]
    for i, r in enumerate(acc.get("grain") or next(iter(acc.values()))):
        cores = [f"{acc[k][i]['host_cores']:.1f}" if k in acc else "-" for k in ("grain", "tf.data")]
        lines.append(f"| {r['accelerator']} | {r['peak_bf16_tflops']:.0f} | {r['train_img_s']:.0f} | "
                     f"{cores[0]} | {cores[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=768, help="generated JPEGs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches, rounded up to even (default: an epoch less the warm-up)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cores", type=int, default=1, help="CPUs each worker is pinned to")
    p.add_argument("--threads", type=int, default=None, help="grain/tf.data threads (2 x cores)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    p.add_argument("--draft", action="store_true", help="grain: input.draft (reduced-size JPEG decode)")
    p.add_argument("--size", default="500x375", help="generated image WxH")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/input_pipeline"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--data", default=None, help="directory for the JPEGs (default: a temp dir)")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad or args.cores < 1 or args.cores > len(os.sched_getaffinity(0)):
        print(f"error: unknown pipeline(s) {bad} or --cores outside 1..{len(os.sched_getaffinity(0))}",
              file=sys.stderr)
        return 2
    args.batches = args.batches or args.images // args.batch - 2
    args.batches = max(2, args.batches + args.batches % 2)
    w, h = (int(x) for x in args.size.lower().split("x"))
    try:  # --data: made if missing; a temporary directory inside it holds this run's JPEGs
        if args.data:
            Path(args.data).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --data {args.data}: cannot create it ({e.strerror}); pass a writable "
              "directory", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        root = Path(tmp)
        data = make_images(root, args.images, size=(w, h))
        print(f"{args.images} JPEGs, mean {data['mean_kb']:.0f} KB", flush=True)
        runs = {i: [] for i in impls}
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate who goes first
                m = measure(impl, args, root)
                runs[impl].append(m)
                print(f"round {r + 1} {impl}: {m['img_s_per_core']:.0f} images/s per core "
                      f"(load {m['load_before']:.1f})", flush=True)
    summary, ratio = summarize(runs)
    import platform
    result = {"command": "python benchmarks/input_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": vars(args), "data": data, "summary": summary, "ratio": ratio,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{len(os.sched_getaffinity(0))} CPUs visible",
              "accelerators": {i: accelerator_needs(s["img_s_per_core"], args.mfu)
                               for i, s in summary.items()},
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out.with_name(f".{out.name}{suffix}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_name(out.name + suffix))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
