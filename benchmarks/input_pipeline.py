"""Can the host feed an accelerator? Images/s per CPU core of the ImageNet training transform.

    python benchmarks/input_pipeline.py --images 1024 --rounds 3 --cores 1

The transform is the paper's (section 3.1): JPEG decode, isotropic rescale of the shorter side to
S ~ U{256..512}, random 224x224 crop, horizontal flip with probability 1/2, AlexNet's PCA colour
shift, uint8 batches. It runs on generated ImageNet-like JPEGs (about 500x375, about 110 KB at
quality 95: scikit-learn's two sample photos, randomly cropped, resized, mirrored and
noised), laid out as an ImageFolder tree, through three pipelines doing the same work:

- ``grain``: ours, ``train/input_pipeline.train_dataset`` on ``dataset=folder``, exactly what
  ``train/train.py`` runs (PIL decode, window-only resize, LUT colour shift, grain threads);
- ``tf.data``: the big_vision / Flax ImageNet example standard (``decode_jpeg``, antialiased
  bilinear ``tf.image.resize`` of the whole image, ``random_crop``, ``random_flip_left_right``,
  the same colour shift in float), ``AUTOTUNE`` parallelism;
- ``torch``: torchvision's ``ImageFolder`` + ``v2.RandomShortestSize(256..512)``,
  ``RandomCrop(224)``, ``RandomHorizontalFlip`` and the colour shift, in a ``DataLoader``.

Each measurement is a fresh worker process pinned to ``--cores`` CPUs (``sched_setaffinity``),
so "per core" is literal; the pipelines alternate within each of ``--rounds`` rounds (the machine
may be shared, interleaving spreads its noise over all three) and the median round is reported.
A worker times whole batches after a warm-up batch.

Then: host cores one accelerator needs for VGG-16 training at a derived step rate:
VGG-16 forward at 224 is 15.47 G multiply-adds (torchvision's meta) = 30.9 GFLOP; a training
step is ~3x the forward (forward, input gradient, weight gradient) = 92.8 GFLOP per image; an
accelerator at ``--mfu`` (default 40%) of its dense bf16 peak trains peak * mfu / 92.8e9 images/s.
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
IMPLS = ("grain", "tf.data", "torch")
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
def _time_batches(it, batches: int, batch: int) -> dict:
    next(it)  # warm-up: threads started, first images decoded
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t0
    return {"images": batches * batch, "seconds": dt, "last_batch_shape": list(b[0].shape)}


def worker_grain(root: Path, batch: int, batches: int, cores: int, threads: int, draft: bool):
    from train import input_pipeline
    from train.configs.base import base
    c = base()
    c.dataset, c.data_dir, c.train_split = "folder", str(root), "train"
    c.input.update(train_kind="scale_jitter", scale_min=256, scale_max=512, crop_size=224,
                   flip=True, colour_shift=0.1, num_threads=threads, prefetch=2 * batch,
                   draft=draft)
    c.batch_size = batch
    src = input_pipeline.get_source(c, "train")
    it = iter(input_pipeline.train_dataset(c, src, 0, 1))
    return _time_batches(((b["image"], b["label"]) for b in it), batches, batch)


def worker_tfdata(root: Path, batch: int, batches: int, cores: int, threads: int, draft: bool):
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    paths, labels = files(root)
    vec = tf.constant(PCA_EIGVEC, tf.float32)
    val = tf.constant(PCA_EIGVAL, tf.float32)

    def load(path, label):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        s = tf.random.uniform([], 256, 513, tf.int32)
        hw = tf.shape(img)[:2]
        short = tf.minimum(hw[0], hw[1])
        # torchvision's size rule: shorter side S, longer side truncated
        new = tf.cast(tf.cast(hw, tf.float32) * tf.cast(s, tf.float32) / tf.cast(short, tf.float32), tf.int32)
        new = tf.where(hw == short, s, new)
        img = tf.image.resize(img, new, method="bilinear", antialias=True)
        img = tf.image.random_crop(img, [224, 224, 3])
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
    ds = ds.with_options(opts)
    return _time_batches(((x.numpy(), y.numpy()) for x, y in ds), batches, batch)


def worker_torch(root: Path, batch: int, batches: int, cores: int, threads: int, draft: bool):
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2
    torch.set_num_threads(1)
    vec = torch.tensor(PCA_EIGVEC)
    val = torch.tensor(PCA_EIGVAL)

    def colour_shift(x):
        shift = 255.0 * (vec @ (torch.randn(3) * 0.1 * val))
        return (x.float() + shift[:, None, None]).round_().clamp_(0, 255).to(torch.uint8)

    t = v2.Compose([v2.RandomShortestSize(list(range(256, 513))), v2.RandomCrop(224),
                    v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.Lambda(colour_shift)])
    ds = datasets.ImageFolder(str(root / "train"), transform=t)
    # one worker process per core; the main process only collates
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=cores,
                                     drop_last=True, persistent_workers=True, prefetch_factor=4)

    def forever():
        while True:
            for x, y in dl:
                yield x.numpy(), y.numpy()
    return _time_batches(forever(), batches, batch)


WORKERS = {"grain": worker_grain, "tf.data": worker_tfdata, "torch": worker_torch}


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
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{impl} worker failed ({p.returncode}): {p.stderr[-2000:]}")
    r = json.loads(line[7:])
    r["img_s"] = r["images"] / r["seconds"]
    r["img_s_per_core"] = r["img_s"] / args.cores
    r["threads"] = threads
    return r


def accelerator_needs(per_core: float, mfu: float) -> list[dict]:
    flop = 3 * 2 * VGG16_GMACS * 1e9
    rows = []
    for name, peak in ACCELERATORS.items():
        rate = peak * mfu / flop
        rows.append({"accelerator": name, "peak_bf16_tflops": peak / 1e12, "mfu": mfu,
                     "train_img_s": rate, "host_cores": rate / per_core})
    return rows


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Input pipeline: ImageNet training transform, images/s per host core",
             "",
             f"`{result['command']}`",
             "",
             f"{a['images']} generated JPEGs ({result['data']['width_x_height']}, mean "
             f"{result['data']['mean_kb']:.0f} KB, quality {result['data']['quality']}); decode, "
             "S ~ U{256..512} rescale, random 224 crop, flip, PCA colour shift; batch "
             f"{a['batch']}, {a['batches']} timed batches per run; each run a fresh process pinned to "
             f"{a['cores']} core(s); {a['rounds']} interleaved rounds, median. Machine: "
             f"{result['machine']}.",
             "",
             "| pipeline | images/s per core (median) | rounds | vs tf.data |",
             "|---|---|---|---|"]
    ref = result["summary"].get("tf.data", {}).get("img_s_per_core")
    for impl, s in result["summary"].items():
        rounds = ", ".join(f"{x:.0f}" for x in s["rounds"])
        rel = f"{s['img_s_per_core'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {impl} | {s['img_s_per_core']:.0f} | {rounds} | {rel} |")
    if "grain" in result["summary"] and ref:
        ratios = [g / t for g, t in zip(result["summary"]["grain"]["rounds"],
                                        result["summary"]["tf.data"]["rounds"])]
        lines += ["", "grain / tf.data within each round (adjacent runs, so closer in machine load than the medians): "
                  + ", ".join(f"{r:.2f}x" for r in ratios) + "."]
    if result.get("load_average"):
        lines += ["", f"Load average before / after the run: {result['load_average']} (other "
                  "jobs on the machine slow every pipeline alike; absolute figures are lower bounds)."]
    lines += ["", f"Host cores per accelerator for VGG-16 training at the grain rate (derived: "
              f"3 x 2 x {VGG16_GMACS} GFLOP per image at {100 * a['mfu']:.0f}% of dense bf16 peak):",
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
    p.add_argument("--images", type=int, default=1024, help="generated JPEGs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default: one epoch)")
    p.add_argument("--rounds", type=int, default=3)
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
    args.batches = args.batches or max(1, args.images // args.batch - 1)
    w, h = (int(x) for x in args.size.lower().split("x"))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        root = Path(tmp)
        data = make_images(root, args.images, size=(w, h))
        print(f"{args.images} JPEGs, mean {data['mean_kb']:.0f} KB", flush=True)
        runs = {i: [] for i in impls}
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate who goes first
                m = measure(impl, args, root)
                runs[impl].append(m)
                print(f"round {r + 1} {impl}: {m['img_s_per_core']:.0f} images/s per core",
                      flush=True)
    summary = {}
    for impl, ms in runs.items():
        rates = [m["img_s_per_core"] for m in ms]
        summary[impl] = {"img_s_per_core": statistics.median(rates), "rounds": rates,
                         "threads": ms[0]["threads"]}
    import platform
    result = {"command": "python benchmarks/input_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": vars(args), "data": data, "summary": summary,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{len(os.sched_getaffinity(0))} CPUs visible",
              "accelerators": {i: accelerator_needs(s["img_s_per_core"], args.mfu)
                               for i, s in summary.items()},
              "runs": runs,
              "load_average": f"{load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"}
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
