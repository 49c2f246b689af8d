"""Your own images: dataset=folder against torchvision's ImageFolder, the grain graph on it, a
fine-tuning run with undecodable files, and the trainer's evaluation against train/eval.py.

Images are crops of scikit-learn's sample photos (real JPEG content) in every common format and
mode; a tiny VGG-11 (1/8 width, 32x32 crops) on the 8 fake devices of conftest. Budget: ~60 s
(two compilations: the run and eval.py).
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

import vgg_flax
from test_train import random_variables
from train import folder, input_pipeline, trainer
from vgg_flax.images import load_image, preprocess

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("b_cat", "a_dog", "c_bird")  # created out of order: indices must be sorted names
TINY = dict(width=0.125, hidden_size=16, pool_size=(1, 1))


def _photo(rng, photos, h, w):
    im = photos[int(rng.integers(len(photos)))]
    bh, bw = 3 * h, 3 * w  # a third of the resolution: photo content, small files
    top, left = int(rng.integers(0, im.height - bh)), int(rng.integers(0, im.width - bw))
    return im.resize((w, h), Image.BILINEAR, box=(left, top, left + bw, top + bh))


def make_tree(root: Path, seed: int = 0, bad: bool = True) -> Path:
    """root/train/<3 classes> with JPEG, PNG, BMP, WebP, TIFF, GIF; grayscale, palette, RGBA;
    a nested folder, a text file, upper-case extensions; root/val without a_dog."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    fmts = [("jpg", lambda im: im), ("PNG", lambda im: im.convert("L")),
            ("png", lambda im: im.quantize(32)), ("bmp", lambda im: im),
            ("webp", lambda im: im), ("tiff", lambda im: im.convert("RGBA")),
            ("JPEG", lambda im: im.convert("L")), ("gif", lambda im: im.quantize(16))]
    for split, classes, n in (("train", CLASSES, 5), ("val", ("c_bird", "b_cat"), 3)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                ext, mode = fmts[(i + len(c)) % len(fmts)]
                im = mode(_photo(rng, photos, int(rng.integers(40, 70)), int(rng.integers(40, 70))))
                sub = d / "nested" if i == 4 else d
                sub.mkdir(exist_ok=True)
                im.save(sub / f"{i:02d}_{c}.{ext}", quality=90) if ext in ("jpg", "JPEG") else \
                    im.save(sub / f"{i:02d}_{c}.{ext}")
            (d / "notes.txt").write_text("not an image")
    if bad:
        (root / "train" / "a_dog" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        png = next((root / "train").rglob("*.[pP][nN][gG]")).read_bytes()
        (root / "val" / "b_cat" / "zz_truncated.png").write_bytes(png[:100])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("photos"))


def tiny_config(data_dir, **kw):
    c = trainer.load_config(ROOT / "train/configs/folder.py")
    c.model_overrides.update(TINY)
    c.input.update(crop_size=32, resize_size=36, scale_min=32, scale_max=40, num_threads=1,
                   prefetch=2)
    c.update(data_dir=str(data_dir), batch_size=8, eval_batch_size=8, total_steps=2,
             checkpoint_every_steps=2, eval_every_steps=2, log_every_steps=1, **kw)
    c.schedule.warmup_steps = 1
    c.mesh.data = 1  # about the data: one device (sharding is test_train's)
    return c


def test_classes_files_and_pixels_equal_torchvision_imagefolder(tree):
    ours = folder.FolderSource(tree, "train")
    ref = torchvision.datasets.ImageFolder(str(tree / "train"))
    assert ours.classes == ref.classes == sorted(CLASSES)
    tv_ext = torchvision.datasets.folder.IMG_EXTENSIONS
    assert [s for s in ours.samples if s[0].lower().endswith(tv_ext)] == ref.samples
    extra = [p for p, _ in ours.samples if not p.lower().endswith(tv_ext)]
    assert extra and all(p.endswith(".gif") for p in extra)  # a PIL format torchvision skips
    by_path = {p: i for i, (p, _) in enumerate(ours.samples)}
    for path, label in ref.samples:
        if path.endswith("zz_broken.jpg"):
            continue
        image = ref.loader(path)
        ex = ours[by_path[path]]
        assert ex["label"] == label and ex["ok"]
        assert ex["image"].mode == "RGB" == image.mode  # grayscale, palette, RGBA -> RGB
        assert np.array_equal(np.asarray(ex["image"]), np.asarray(image)), path
    # val is indexed with train's classes although it lacks a_dog (ImageFolder alone would
    # call b_cat 0 there)
    val = input_pipeline.get_source(tiny_config(tree), "val")
    assert val.classes == ours.classes
    assert {l for p, l in val.samples} == {1, 2}


def test_grain_graph_shuffles_shares_and_resumes(tree):
    c = trainer.resolved(tiny_config(tree))
    src = input_pipeline.get_source(c, "train")
    one = iter(input_pipeline.train_dataset(c, src, 0, 1))
    full = [next(one) for _ in range(3)]
    # per-process rows: 2 processes' batches are the halves of the 1-process batch
    halves = [iter(input_pipeline.train_dataset(c, src, p, 2)) for p in range(2)]
    for b in full:
        parts = [next(h) for h in halves]
        for k in ("image", "label"):
            assert np.array_equal(np.concatenate([p[k] for p in parts]), b[k])
    # global shuffle: not the file order; every label present over an epoch
    labels = np.concatenate([b["label"] for b in full])
    assert not np.array_equal(labels, sorted(labels)) and set(labels) == {0, 1, 2}
    # checkpointed iterator: state after one batch reproduces the next two
    it = iter(input_pipeline.train_dataset(c, src, 0, 1))
    next(it)
    state = it.get_state()
    again = iter(input_pipeline.train_dataset(c, src, 0, 1))
    again.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    for b in full[1:]:
        assert np.array_equal(next(again)["image"], b["image"])


@pytest.mark.parametrize("case, message", [
    ("missing_root", "is not a directory"),
    ("empty_root", "no split folder .*train .*ROOT holds: nothing"),
    ("no_class_folders", "has no class folders"),
    ("class_without_images", "class folder.*with no images.*empty_class"),
    ("val_class_not_in_train", "class folders the training split lacks: zebra"),
    ("no_data_dir", "needs --config.data_dir"),
])
def test_bad_folders_are_one_line(case, message, tmp_path):
    root = tmp_path / "root"
    if case != "missing_root":
        root.mkdir()
    if case in ("no_class_folders", "class_without_images", "val_class_not_in_train"):
        (root / "train").mkdir()
        (root / "train" / "img.jpg").write_bytes(b"")
    if case in ("class_without_images", "val_class_not_in_train"):
        (root / "train" / "cat").mkdir()
        Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "a.png")
        (root / "val" / "cat").mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(root / "val" / "cat" / "b.png")
    if case == "class_without_images":
        (root / "train" / "empty_class").mkdir()
        (root / "train" / "empty_class" / "readme.txt").write_text("x")
    if case == "val_class_not_in_train":
        (root / "val" / "zebra").mkdir()
    c = tiny_config(root)
    if case == "no_data_dir":
        c.data_dir = None
    with pytest.raises(trainer.ConfigError, match=message) as e:
        trainer.prepare(c, tmp_path / "w")
    assert "\n" not in str(e.value)


def test_cli_empty_root_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(ROOT / "train/train.py"), "--config",
                          str(ROOT / "train/configs/folder.py"),
                          f"--config.data_dir={tmp_path / 'empty'}", "--workdir",
                          str(tmp_path / "w")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "no split folder" in errors[0], run.stderr[-2000:]


def test_recipe():
    c = trainer.load_config(ROOT / "train/configs/folder.py")
    assert (c.model, c.dataset, c.train_split, c.eval_split) == ("vgg16", "folder", "train", "val")
    assert (c.input.crop_size, c.input.resize_size, c.input.train_kind) == (224, 256, "scale_jitter")
    assert c.init_from is None and c.init_from_layers == ""  # shape-matching: fc8 re-initialised
    assert tuple(c.input.mean) == tuple(vgg_flax.metadata("vgg16")["preprocessing"]["mean"])


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """2 steps of the folder recipe from a 'converted' 5-class checkpoint, with a broken JPEG in
    train and a truncated PNG in val. VGG-11 instead of the recipe's VGG-16: half the layers to
    compile, the same code path."""
    tmp = tmp_path_factory.mktemp("run")
    module = vgg_flax.create("vgg11", num_classes=5, **TINY)
    # any values will do (numpy's: compiling the model's initialiser takes ~10 s here)
    variables = random_variables(module, jnp.zeros((1, 32, 32, 3)), seed=3, scale=0.05)
    src = vgg_flax.save(tmp / "converted", variables, "vgg11", module=module)
    c = tiny_config(tree, init_from=str(src), learning_rate=0.01, model="vgg11")
    logger = logging.getLogger("vgg_flax.train")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = trainer.train_and_evaluate(c, tmp / "work")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return c, result, [r.getMessage() for r in records], tmp, src


def test_undecodable_files_are_skipped_reported_and_counted(run, tree):
    c, result, messages, _, _ = run
    assert result["status"] == "done" and result["step"] == 2
    broken = str(tree / "train" / "a_dog" / "zz_broken.jpg")
    truncated = str(tree / "val" / "b_cat" / "zz_truncated.png")
    as_met = [m for m in messages if "skipped during this run" not in m]
    assert sum(broken in m and "skipped" in m for m in as_met) == 1  # reported once
    assert sum(truncated in m and "skipped" in m for m in as_met) == 1
    assert any("val: 1 undecodable file(s) skipped and masked out" in m for m in messages)
    val_files = len(folder.FolderSource(tree, "val", sorted(CLASSES)).samples)
    assert result["eval_examples"] == val_files - 1  # the truncated PNG counts for nothing
    # the end-of-run line: the count per split and the files, in the order they were met
    end = [m for m in messages if "skipped during this run" in m]
    assert len(end) == 1 and end[0].startswith("2 undecodable file(s) skipped during this run "
                                               "(train 1, val 1): "), end
    assert broken in end[0] and truncated in end[0] and "\n" not in end[0]
    assert result["skipped_files"] == 2 and set(result["skipped_first"]) == {broken, truncated}
    last = json.loads((run[3] / "work" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "eval_top1" in last
    assert last["skipped_files"] == 2 and last["skipped_per_split"] == {"train": 1, "val": 1}
    assert set(last["skipped_first"]) == {broken, truncated}


def test_head_reinitialised_for_the_folder_classes(run):
    _, result, messages, _, src = run
    assert result["state"]["params"]["fc8"]["kernel"].shape[-1] == 3
    assert any("fc8 re-initialised" in m for m in messages), messages
    info = json.loads((Path(result["workdir"]) / "train_config.json").read_text())
    assert info["dataset_info"]["class_names"] == sorted(CLASSES)
    _, source = vgg_flax.load(src)
    # copied, then moved by two small steps: close to the source, far from a fresh init
    a = np.asarray(result["state"]["params"]["conv1_1"]["kernel"])
    b = np.asarray(source["params"]["conv1_1"]["kernel"])
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_trainer_evaluation_equals_eval_cli(run, tree, tmp_path, capsys):
    """Same inputs bit for bit, same top-1/top-5 on the exported checkpoint."""
    c, result, _, _, _ = run
    c = trainer.resolved(c)
    # the trainer's eval input (uint8 pipeline + on-device normalisation) is preprocess()'s
    src = input_pipeline.get_source(c, "val")
    batch = next(iter(input_pipeline.eval_dataset(c, src, 0, 1)))
    x = np.asarray(jax.jit(lambda b: trainer._normalise(c, b, jnp.float32))(batch["image"]))
    settings = dict(vgg_flax.metadata("vgg11")["preprocessing"], resize_size=36, crop_size=32)
    for i, (path, _) in enumerate(src.samples[:len(x)]):
        if batch["mask"][i]:
            ref = preprocess(load_image(path), settings)
            assert np.array_equal(x[i].view(np.uint32), ref.view(np.uint32)), path
    out = trainer.export(result["workdir"], tmp_path / "export")
    # the exported checkpoint names its classes; classify prints them
    from vgg_flax import classify
    assert vgg_flax.checkpoint.read_info(out)["categories"] == sorted(CLASSES)
    assert classify.main([src.samples[0][0], "--weights", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{name} ({i})" in printed for i, name in enumerate(sorted(CLASSES))), printed
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "train/eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--weights", str(out), "--dataset", "folder", "--data-dir", str(tree),
            "--protocol", "single", "--resize-size", "36", "--crop-size", "32",
            "--batch-size", "8"]
    # the truncated file stops eval.py with its path (it must not count a stand-in) ...
    with pytest.raises(SystemExit, match="zz_truncated.png: cannot decode"):
        cli.main(args)
    # ... and without it eval.py sees what the trainer evaluated
    clean = make_tree(tmp_path / "clean", bad=False)
    for p in (tree / "val").rglob("*"):
        if p.is_file() and p.name != "zz_truncated.png":
            assert (clean / p.relative_to(tree)).read_bytes() == p.read_bytes()
    got = cli.main(args[:5] + [str(clean)] + args[6:])
    assert got["images"] == result["eval_examples"]
    assert got["top1_error"] == pytest.approx(100 * (1 - result["eval_top1"]))
    assert got["top5_error"] == pytest.approx(100 * (1 - result["eval_top5"]))


def _png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit PNG of uint16 ``a`` (H, W) or (H, W, 3): PIL writes 16-bit grayscale, not RGB."""
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 0 if a.ndim == 2 else 2, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_pngs_read_as_their_8bit_versions(tmp_path):
    """A 16-bit grayscale PNG of a photo is not a white image (which RGB conversion, clipping at
    255, would make it): through the folder source (training, the trainer's evaluation and
    train/eval.py read it), the training and evaluation transforms and classify's reader, it is
    its 8-bit version to within 1/255. 16-bit RGB too."""
    photo = _photo(np.random.default_rng(0), [Image.fromarray(load_sample_images().images[1])],
                   60, 80)
    noise = np.random.default_rng(1).integers(0, 257, (60, 80, 3))
    rgb = np.asarray(photo).astype(np.int64)
    for split in ("train", "val"):
        d = tmp_path / split / "flower"
        d.mkdir(parents=True)
        photo.save(d / "rgb8.png")
        photo.convert("L").save(d / "gray8.png")
        _png16(d / "rgb16.png", np.minimum(rgb * 257 + noise, 65535).astype(np.uint16))
        gray = np.asarray(photo.convert("L")).astype(np.int64)
        _png16(d / "gray16.png", np.minimum(gray * 257 + noise[..., 0], 65535).astype(np.uint16))
    assert Image.open(d / "gray16.png").mode == "I;16"
    c = trainer.resolved(tiny_config(tmp_path))
    train, val = (input_pipeline.get_source(c, s) for s in ("train", "val"))
    names = [Path(p).name for p, _ in train.samples]
    assert names == ["gray16.png", "gray8.png", "rgb16.png", "rgb8.png"]
    assert [Path(p).name for p, _ in val.samples] == names

    def close(a, b, what):
        a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, what
    transform = input_pipeline.make_train_transform(c.input)
    eval_batch = next(iter(input_pipeline.eval_dataset(c, val, 0, 1)))["image"]
    for wide, narrow in ((0, 1), (2, 3)):
        close(train[wide]["image"], train[narrow]["image"], names[wide])
        close(load_image(train.samples[wide][0]), load_image(train.samples[narrow][0]), "classify")
        close(*(transform(train[i], np.random.default_rng(5))["image"] for i in (wide, narrow)),
              "training transform")
        close(eval_batch[wide], eval_batch[narrow], "evaluation input")
    assert np.asarray(train[0]["image"]).mean() < 200  # not white


def test_draft_decodes_big_jpegs_at_reduced_size(tmp_path):
    """input.draft: a 1200x900 JPEG decodes at 1/2 scale for S <= 450 (1/4 would be 225 < 256)."""
    photo = Image.fromarray(load_sample_images().images[0]).resize((1200, 900))
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    photo.save(d / "big.jpg", quality=90)
    photo.convert("L").save(d / "gray.jpg", quality=90)
    c = tiny_config(tmp_path)
    c.input.update(scale_min=256, scale_max=300, resize_size=256, crop_size=224)
    assert [ex["image"].size for ex in input_pipeline.get_source(c, "train")] == [(1200, 900)] * 2
    c.input.draft = True
    drafted = input_pipeline.get_source(c, "train")
    assert [(ex["image"].size, ex["image"].mode) for ex in drafted] == [((600, 450), "RGB")] * 2


def test_a_file_named_for_another_format_still_decodes(tmp_path):
    """decode opens a file with its extension's decoder first, then with every format: a PNG
    named .jpg reads as the PNG it is, a JPEG as PIL reads it."""
    photo = Image.fromarray(load_sample_images().images[1]).resize((64, 48))
    photo.save(tmp_path / "png_inside.jpg", format="PNG")
    photo.save(tmp_path / "real.JPG", quality=90)
    assert np.array_equal(np.asarray(folder.decode(str(tmp_path / "png_inside.jpg"))),
                          np.asarray(photo))
    with Image.open(tmp_path / "real.JPG") as ref:
        assert np.array_equal(np.asarray(folder.decode(str(tmp_path / "real.JPG"))),
                              np.asarray(ref))
    assert folder._formats(".JPG") == ("JPEG",) and folder._formats(".txt") is None
