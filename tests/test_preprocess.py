"""vgg_flax.preprocess equals torchvision's own weight transforms, bit for bit (float32).

Reference: ``torchvision.models.VGG16_Weights.{IMAGENET1K_V1, IMAGENET1K_FEATURES}.transforms()``
applied to PIL images (after ``.convert("RGB")``, as torchvision's ImageFolder loader does; the
transforms themselves reject 1- and 4-channel images). Tolerance: none, arrays compared exactly.
Budget: ~5 s.
"""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms._presets import ImageClassification

from vgg_flax.images import (as_pil, center_crop, load_image, preprocess, rescale,
                                 resized_size, to_rgb)

WEIGHTS = {
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "vgg16_ssd": torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES,
}


def reference(image: Image.Image, transforms) -> np.ndarray:
    """torchvision's output as float32 HWC."""
    return transforms(image.convert("RGB")).permute(1, 2, 0).numpy()


def assert_bit_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, (f"{diff.size} values differ, max abs "
                            f"{np.abs(ours - ref).max()}")


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg


def _generated():
    """Odd sizes and every PIL mode an image file commonly decodes to."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    cases = {
        "rgb_301x517": Image.fromarray(rgb(301, 517)),
        "rgb_portrait_517x301": Image.fromarray(rgb(517, 301)),
        "rgb_exactly_256x256": Image.fromarray(rgb(256, 256)),      # no resampling pass
        "rgb_256x999": Image.fromarray(rgb(256, 999)),               # short side already 256
        "rgb_257x256": Image.fromarray(rgb(257, 256)),
        "rgb_odd_crop_offset_259x261": Image.fromarray(rgb(259, 261)),
        "tiny_1x1": Image.fromarray(rgb(1, 1)),
        "tiny_2x3": Image.fromarray(rgb(2, 3)),
        "tiny_3x2": Image.fromarray(rgb(3, 2)),
        "strip_1x700": Image.fromarray(rgb(1, 700)),
        "strip_700x1": Image.fromarray(rgb(700, 1)),
        "gray_L_190x333": Image.fromarray(rng.integers(0, 256, (190, 333), dtype=np.uint8)),
        "rgba_250x400": Image.fromarray(rng.integers(0, 256, (250, 400, 4), dtype=np.uint8)),
        "gray_alpha_LA_120x90": Image.merge(
            "LA", [Image.fromarray(rgb(120, 90)[..., i].copy()) for i in (0, 1)]),
        "palette_P_200x300": Image.fromarray(rgb(200, 300)).quantize(64),
        "bilevel_1_64x48": Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)).convert("1"),
        "cmyk_100x150": Image.fromarray(rgb(100, 150)).convert("CMYK"),
        "int32_I_80x120": Image.fromarray(rng.integers(0, 300, (80, 120)).astype(np.int32)),
    }
    return cases


GENERATED = _generated()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_sample_photos_equal_torchvision(photos, name):
    t = WEIGHTS[name].transforms()
    for im in photos:
        ref = reference(im, t)
        assert_bit_equal(preprocess(im, name), ref)
        assert_bit_equal(preprocess(np.asarray(im), name), ref)  # the uint8 array path


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("case", list(GENERATED))
def test_generated_images_equal_torchvision(case, name):
    im = GENERATED[case]
    assert_bit_equal(preprocess(im, name), reference(im, WEIGHTS[name].transforms()))


def test_array_modes_match_pil_modes():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    t = WEIGHTS["vgg16"].transforms()
    assert_bit_equal(preprocess(gray), reference(Image.fromarray(gray), t))
    assert_bit_equal(preprocess(gray[..., None]), reference(Image.fromarray(gray), t))
    assert_bit_equal(preprocess(rgba), reference(Image.fromarray(rgba), t))
    # alpha is dropped, not composited: RGBA equals its RGB channels
    np.testing.assert_array_equal(preprocess(rgba), preprocess(np.ascontiguousarray(rgba[..., :3])))


def test_16bit_images_are_scaled_not_clipped(photos):
    """16-bit grayscale (PIL "I;16", "I;16B"; uint16 arrays, as a TFDS uint16 image) is its 8-bit
    image to within 1/255, RGB or kept one-channel (as_pil, the trainer's); RGB conversion alone
    clips it to 255: white."""
    gray = np.asarray(photos[0].convert("L")).astype(np.int64)
    noise = np.random.default_rng(0).integers(0, 257, gray.shape)
    wide = np.minimum(gray * 257 + noise, 65535).astype(np.uint16)  # a 16-bit image of it
    assert np.asarray(Image.fromarray(wide).convert("RGB")).mean() > 250
    big_endian = Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes())
    for x in (Image.fromarray(wide), big_endian, wide):
        rgb = np.asarray(to_rgb(x)).astype(int)
        assert rgb.shape == gray.shape + (3,) and np.abs(rgb - gray[..., None]).max() <= 1
        assert np.abs(np.asarray(as_pil(x)).astype(int) - gray).max() <= 1
    wide_rgb = (np.asarray(photos[0]).astype(np.uint16) * 257)
    np.testing.assert_array_equal(np.asarray(as_pil(wide_rgb)), np.asarray(photos[0]))
    np.testing.assert_array_equal(preprocess(wide_rgb), preprocess(photos[0]))


def test_crop_larger_than_resize_pads_like_torchvision():
    """resize 200 < crop 224: torchvision zero-pads before cropping; so must we (offsets too)."""
    settings = dict(resize_size=200, crop_size=224, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                    interpolation="bilinear")
    t = ImageClassification(crop_size=224, resize_size=200, mean=settings["mean"],
                            std=settings["std"])
    for h, w in [(200, 200), (300, 201), (201, 333), (5, 9)]:
        im = GENERATED["rgb_301x517"].resize((w, h))
        assert_bit_equal(preprocess(im, settings), reference(im, t))


def test_resized_size_and_center_crop_follow_torchvision():
    from torchvision.transforms.functional import _compute_resized_output_size
    for hw in [(1, 1), (2, 3), (427, 640), (640, 427), (3, 1000), (999, 256), (255, 257)]:
        for size in (224, 256, 384, 512):
            assert list(resized_size(*hw, size)) == _compute_resized_output_size(hw, [size])
    x = np.arange(7 * 10).reshape(7, 10, 1).astype(np.uint8)
    ref = torchvision.transforms.functional.center_crop(torch.from_numpy(x).permute(2, 0, 1), [4, 5])
    np.testing.assert_array_equal(center_crop(x, (4, 5)), ref.permute(1, 2, 0).numpy())


def test_rescale_is_the_uncropped_image(photos):
    """Dense-evaluation input: shorter side Q, no crop, same normalisation as preprocess."""
    t = ImageClassification(crop_size=384, resize_size=384)
    im = photos[0]  # 427x640 -> 384x575
    out = rescale(im, 384, "vgg16")
    assert out.shape == (384, 575, 3)
    full = torchvision.transforms.Compose([
        torchvision.transforms.Resize(384), torchvision.transforms.PILToTensor(),
        torchvision.transforms.ConvertImageDtype(torch.float32),
        torchvision.transforms.Normalize(t.mean, t.std)])
    assert_bit_equal(out, full(im).permute(1, 2, 0).numpy())


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="HWC"):
        preprocess(np.zeros((3, 10, 10, 2), np.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess("not an image")
    with pytest.raises(ValueError, match="unknown VGG"):
        preprocess(GENERATED["tiny_1x1"], "vgg17")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        load_image(junk)
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    GENERATED["rgb_301x517"].save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(truncated)


def test_load_image_applies_exif_orientation(tmp_path):
    im = GENERATED["rgb_301x517"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rot.jpg").size == (301, 517)
    assert load_image(tmp_path / "rot.jpg", exif_transpose=False).size == (517, 301)
    assert to_rgb(GENERATED["gray_L_190x333"]).mode == "RGB"


def test_normalize_lookup_is_normalize_on_device():
    """The trainer's on-device normalisation is bit-equal to preprocess's (XLA's x * (1/255)
    would not be), for three channels and one."""
    import jax
    import jax.numpy as jnp
    from vgg_flax.images import normalize, normalize_lookup
    rng = np.random.default_rng(2)
    for mean, std, c in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3), ((0.3,), (0.4,), 1)]:
        x = rng.integers(0, 256, (4, 9, 7, c), dtype=np.uint8)
        got = np.asarray(jax.jit(lambda a: normalize_lookup(a, mean, std, xp=jnp))(x))
        assert_bit_equal(got, normalize(x, mean, std))
        assert_bit_equal(normalize_lookup(x, mean, std), normalize(x, mean, std))


def test_verification_input(photos):
    """What the converter verifies on: preprocess() for classifiers, SSD300's fixed square
    (torchvision Resize((300, 300)) + the features weights' normalisation), grayscale at 0..1."""
    from vgg_flax.images import verification_input
    im = photos[0]
    assert_bit_equal(verification_input(im, "vgg16"), preprocess(im, "vgg16"))
    t = WEIGHTS["vgg16_ssd"].transforms()
    ssd = torchvision.transforms.Compose([
        torchvision.transforms.Resize((300, 300)), torchvision.transforms.PILToTensor(),
        torchvision.transforms.ConvertImageDtype(torch.float32),
        torchvision.transforms.Normalize(t.mean, t.std)])
    assert_bit_equal(verification_input(im, "vgg16_ssd"), ssd(im).permute(1, 2, 0).numpy())
    gray = verification_input(im, "vgg16", channels=1)
    ref = torchvision.transforms.Compose([
        torchvision.transforms.Grayscale(), torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224), torchvision.transforms.PILToTensor(),
        torchvision.transforms.ConvertImageDtype(torch.float32)])(im)
    assert_bit_equal(gray, ref.permute(1, 2, 0).numpy())
