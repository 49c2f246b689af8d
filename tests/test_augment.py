"""Training augmentation (train/input_pipeline.make_train_transform on vgg_flax.images), seeded.

Geometry against torchvision on scikit-learn's sample photos: the scale-jitter window equals
``Resize(S)`` then crop within two grey levels on <1% of values (PIL's fixed-point weights, see
``scale_jitter_crop``: at most 1 per pass, 2 in all), torchvision's random resized crop exactly. Sampling laws checked
statistically with fixed seeds and 5-sigma bands (a correct law fails with p < 1e-6): S uniform
on {S_min..S_max}, crop offsets uniform, flips half the time, colour-shift coefficients
N(0, sigma^2) along ImageNet's PCA axes. Every output equals the composition of the parameters
the transform drew. Budget: ~5 s.
"""
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from train import input_pipeline
from vgg_flax.images import (PCA_EIGVAL, PCA_EIGVEC, colour_shift, pca_shift,
                                 random_resized_crop_params, resize_shorter, resized_crop,
                                 resized_size, scale_jitter_crop)

SIGMAS = 5.0


@pytest.fixture(scope="module")
def small():
    """Thumbnails for the sampling laws (thousands of draws; the law does not depend on size)."""
    return [Image.fromarray(a).resize((80, 60)) for a in load_sample_images().images]


SMALL = dict(scale_min=32, scale_max=96, crop_size=24)


@pytest.fixture(scope="module")
def photos():
    ims = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640
    return ims + [ims[1].resize((375, 500)), ims[0].resize((500, 333))]  # portrait, odd size


def cfg(**kw):
    c = dict(image_key="image", label_key="label", train_kind="scale_jitter", scale_min=256,
             scale_max=512, crop_size=224, resize_size=256, flip=True, colour_shift=0.1)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def tv(im):
    return F.pil_to_tensor(im).permute(1, 2, 0).numpy()


def test_scale_jitter_window_equals_torchvision_resize_then_crop(photos):
    rng = np.random.default_rng(0)
    differing = total = 0
    for t in range(40):
        im = photos[t % len(photos)]
        s = int(rng.integers(256, 513))
        h, w = resized_size(im.height, im.width, s)
        top, left = int(rng.integers(0, h - 224 + 1)), int(rng.integers(0, w - 224 + 1))
        ref = tv(F.crop(F.resize(im, [s], antialias=True), top, left, 224, 224))
        ours = np.asarray(scale_jitter_crop(im, s, top, left, 224))
        d = np.abs(ours.astype(int) - ref)
        assert d.max() <= 2, (s, top, left, d.max())  # 1 in each of PIL's two passes
        differing += (d > 0).sum()
        total += d.size
    assert differing / total < 0.01  # a few boundary roundings, not a different filter
    # at S equal to the image's shorter side there is no resampling: exact
    im = photos[2]
    assert np.array_equal(np.asarray(scale_jitter_crop(im, 375, 10, 20, 224)),
                          np.asarray(im)[10:234, 20:244])
    with pytest.raises(ValueError, match="outside"):
        scale_jitter_crop(im, 256, 0, 200, 224)


def test_random_resized_crop_equals_torchvision(photos):
    rng = np.random.default_rng(1)
    for t in range(8):
        im = photos[t % len(photos)]
        top, left, h, w = random_resized_crop_params(im.height, im.width, rng)
        assert 0 <= top <= im.height - h and 0 <= left <= im.width - w
        ref = F.resized_crop(F.pil_to_tensor(im), top, left, h, w, [224, 224], antialias=True)
        ref_pil = tv(F.resized_crop(im, top, left, h, w, [224, 224]))
        ours = np.asarray(resized_crop(im, top, left, h, w, 224))
        assert np.array_equal(ours, ref_pil)
        assert np.abs(ours.astype(int) - ref.permute(1, 2, 0).numpy()).max() <= 3  # tensor path
    # the law: area fraction in [0.08, 1], log aspect ratio within log(3/4)..log(4/3)
    draws = np.array([random_resized_crop_params(427, 640, rng) for _ in range(2000)])
    frac = draws[:, 2] * draws[:, 3] / (427 * 640)
    ratio = draws[:, 3] / draws[:, 2]
    assert frac.min() >= 0.07 and frac.max() <= 1.0
    assert np.all((ratio > 0.7) & (ratio < 1.45))
    # the same law as torchvision's get_params: compare mean area fractions (5 sigma)
    torch.manual_seed(0)
    probe = torch.empty(3, 427, 640)
    tv_frac = np.array([np.prod(v2.RandomResizedCrop.get_params(
        probe, [0.08, 1.0], [3 / 4, 4 / 3])[2:]) for _ in range(1000)]) / (427 * 640)
    se = np.hypot(frac.std() / np.sqrt(2000), tv_frac.std() / np.sqrt(1000))
    assert abs(frac.mean() - tv_frac.mean()) < SIGMAS * se


def _recorded(monkeypatch, photos, n, **kw):
    """Run the train transform ``n`` times (seed i), recording every parameter it drew."""
    calls = []
    real_crop, real_shift, real_pca = (input_pipeline.scale_jitter_crop,
                                       input_pipeline.colour_shift, input_pipeline.pca_shift)

    def crop(im, s, top, left, c):
        calls.append({"image": im, "s": s, "top": top, "left": left, "flip": False,
                      "alpha": None})
        return real_crop(im, s, top, left, c)

    def pca(alpha):
        calls[-1]["alpha"] = np.array(alpha)
        return real_pca(alpha)

    monkeypatch.setattr(input_pipeline, "scale_jitter_crop", crop)
    monkeypatch.setattr(input_pipeline, "pca_shift", pca)
    real_transpose = Image.Image.transpose

    def transpose(self, method):
        calls[-1]["flip"] = True
        return real_transpose(self, method)

    monkeypatch.setattr(Image.Image, "transpose", transpose)
    t = input_pipeline.make_train_transform(cfg(**kw))
    outs = [t({"image": photos[i % len(photos)], "label": 3}, np.random.default_rng(i))
            for i in range(n)]
    monkeypatch.undo()
    assert len(calls) == n
    return calls, outs, (real_crop, real_shift, real_pca)


def _band(values, mean, var):
    return abs(np.mean(values) - mean) < SIGMAS * np.sqrt(var / len(values))


def test_scale_jitter_law(monkeypatch, small):
    calls, outs, _ = _recorded(monkeypatch, small, 2000, colour_shift=0.0, flip=False, **SMALL)
    s = np.array([c["s"] for c in calls])
    assert s.min() == 32 and s.max() == 96  # both ends drawn (each has p = 1/65 per draw)
    # uniform on {32..96}: mean 64, variance (65^2 - 1) / 12; and 4 equal-width bins
    assert _band(s, 64, (65 ** 2 - 1) / 12)
    counts = np.histogram(s, bins=4, range=(32, 97.25))[0]
    expect = len(s) / 4
    assert np.all(np.abs(counts - expect) < SIGMAS * np.sqrt(expect * 0.75)), counts
    # offsets uniform over every valid position: u = offset / range ~ U[0, 1]
    u = []
    for c in calls:
        h, w = resized_size(c["image"].height, c["image"].width, c["s"])
        u += [c["top"] / (h - 24), c["left"] / (w - 24)]
    assert _band(u, 0.5, 1 / 12)
    for c, o in zip(calls, outs):
        assert o["image"].shape == (24, 24, 3) and o["image"].dtype == np.uint8
        assert o["label"] == 3


def test_each_output_is_the_drawn_parameters_composed(monkeypatch, photos):
    calls, outs, (real_crop, _, real_pca) = _recorded(monkeypatch, photos, 60)
    for c, o in zip(calls, outs):
        x = real_crop(c["image"], c["s"], c["top"], c["left"], 224)
        ref = np.asarray(x, np.float64)
        if c["flip"]:
            ref = ref[:, ::-1]
        ref = np.clip(np.round(ref + real_pca(c["alpha"])), 0, 255)
        assert np.array_equal(o["image"], ref.astype(np.uint8))
    flips = [c["flip"] for c in calls]
    assert 0 < sum(flips) < len(flips)
    # seeded: same seed, same output; the flip and the crop do change the pixels
    t = input_pipeline.make_train_transform(cfg())
    a = t({"image": photos[0], "label": 0}, np.random.default_rng(7))["image"]
    b = t({"image": photos[0], "label": 0}, np.random.default_rng(7))["image"]
    c = t({"image": photos[0], "label": 0}, np.random.default_rng(8))["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_flip_law(monkeypatch, small):
    calls, _, _ = _recorded(monkeypatch, small, 2000, colour_shift=0.0, **SMALL)
    assert _band([c["flip"] for c in calls], 0.5, 0.25)
    calls, _, _ = _recorded(monkeypatch, small, 50, colour_shift=0.0, flip=False, **SMALL)
    assert not any(c["flip"] for c in calls)


def test_colour_shift_law(monkeypatch, small):
    calls, _, _ = _recorded(monkeypatch, small, 2000, colour_shift=0.1, flip=False, **SMALL)
    alpha = np.array([c["alpha"] for c in calls])
    for k in range(3):  # alpha_k ~ N(0, 0.1^2): mean and variance (var of s^2 is 2 sigma^4)
        assert _band(alpha[:, k], 0.0, 0.01)
        assert _band(alpha[:, k] ** 2, 0.01, 2 * 0.01 ** 2)
    # shifts along ImageNet's PCA axes: the covariance is 255^2 V diag(sigma^2 lambda^2) V^T
    shifts = np.array([pca_shift(a) for a in alpha])
    cov = np.cov(shifts.T)
    expect = 255 ** 2 * PCA_EIGVEC @ np.diag(0.01 * PCA_EIGVAL ** 2) @ PCA_EIGVEC.T
    assert np.allclose(cov, expect, atol=0.15 * np.abs(expect).max())
    # in the eigenbasis each shift's coordinates are 255 * alpha * lambda exactly
    coords = shifts @ PCA_EIGVEC / 255.0
    assert np.allclose(coords, alpha * PCA_EIGVAL, atol=1e-5)  # V orthonormal to 4 digits
    calls, _, _ = _recorded(monkeypatch, small, 20, colour_shift=0.0, **SMALL)
    assert all(c["alpha"] is None for c in calls)


def test_colour_shift_lut_equals_float_arithmetic():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    for shift in ([0.5, -0.5, 1.5], [40.2, -300.0, 12.49999], [-0.0, 254.7, -255.0]):
        ours = np.asarray(colour_shift(Image.fromarray(x), np.array(shift)))
        ref = np.clip(np.round(x + np.array(shift)), 0, 255).astype(np.uint8)
        assert np.array_equal(ours, ref)


def test_one_channel_images_and_eval_transform(photos):
    """Digits-style (H, W, 1) arrays keep one channel; eval is resize_shorter + center crop."""
    gray = np.asarray(photos[0].convert("L"))[..., None]
    t = input_pipeline.make_train_transform(cfg(scale_min=32, scale_max=40, crop_size=32))
    out = t({"image": gray, "label": 1}, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 1)
    ev = input_pipeline.make_eval_transform(cfg(resize_size=36, crop_size=32))
    got = ev({"image": gray, "label": 1})["image"]
    ref = np.asarray(resize_shorter(Image.fromarray(gray[..., 0]), 36))
    assert got.shape == (32, 32, 1)
    top, left = int(round((ref.shape[0] - 32) / 2)), int(round((ref.shape[1] - 32) / 2))
    assert np.array_equal(got[..., 0], ref[top:top + 32, left:left + 32])


def test_training_decode_applies_exif_orientation(tmp_path, photos):
    """``train.folder.decode`` turns an image upright in place (no copy without a tag); the
    pixels are the plain decode's either way."""
    from train.folder import decode
    from vgg_flax.images import load_image
    im = photos[3].resize((90, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    im.save(tmp_path / "plain.jpg", quality=95)
    rot = decode(str(tmp_path / "rot.jpg"))
    assert rot.size == (50, 90) and rot.mode == "RGB"
    assert np.array_equal(np.asarray(rot), np.asarray(load_image(tmp_path / "rot.jpg")))
    plain = decode(str(tmp_path / "plain.jpg"))
    with Image.open(tmp_path / "plain.jpg") as ref:
        assert plain.size == (90, 50) and np.array_equal(np.asarray(plain), np.asarray(ref))


def test_digits_are_scikit_learns_in_its_split(monkeypatch):
    """The digits source reads scikit-learn's CSV without importing scikit-learn: the same
    images and labels as ``load_digits``, split as ``train_test_split`` splits them (order
    too: it fixes the shuffle and the evaluation order); and through ``load_digits`` itself
    when the CSV is not where scikit-learn keeps it."""
    import importlib.util

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    train, test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0,
                                   stratify=d.target)
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    for split, idx in (("train", train), ("test", test)):
        src = input_pipeline.DigitsSource(split)
        got = [src[i] for i in range(len(src))]
        assert len(got) == len(idx)
        assert np.array_equal(np.stack([ex["image"] for ex in got]), images[idx])
        assert np.array_equal([ex["label"] for ex in got], d.target[idx])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn"
                        else real(name, *a))
    fallback = input_pipeline.load_digits.__wrapped__()  # past the per-process cache
    assert np.array_equal(fallback[0], d.images) and np.array_equal(fallback[1], d.target)
