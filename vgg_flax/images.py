"""Image preprocessing identical to each weight's torchvision transforms, in numpy/PIL only.

torchvision's ``VGG16_Weights.IMAGENET1K_V1.transforms()`` on a PIL image is: resize the shorter
side to 256 with PIL's bilinear filter (PIL always antialiases), center crop 224 (zero padding if
the image is smaller), ``uint8 / 255`` in float32, subtract the mean and divide by the std. The
same steps here, in the same order and float32 arithmetic, give the same array to the last bit
(tests/test_preprocess.py checks that against torchvision itself), without torch at run time.

Image modes: torchvision's transforms fail on grayscale (1 channel) and RGBA (4 channels) input,
because the 3-channel mean does not broadcast; its ``ImageFolder`` loader calls
``Image.convert("RGB")`` first. ``preprocess`` does the same: grayscale is replicated to three
channels, palette images are expanded, and alpha is dropped (not composited on a background), so
``preprocess(img, name)`` equals ``transforms(img.convert("RGB"))`` for every PIL mode but
16-bit grayscale, which ``convert`` clips to 255 (a white image) and ``to_8bit`` scales.

This module owns the geometry for the whole repository: classification, ``train/eval.py``, the
trainer's evaluation (``resize_shorter`` + ``center_crop`` on uint8, ``normalize`` on device),
the converter's verification images (``verification_input``) and training augmentation (the
paper's scale jittering is ``scale_jitter_crop``: the same shorter-side resize at a random S).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vgg_flax import registry

# torchvision's InterpolationMode -> PIL filter (torchvision.transforms.functional.pil_modes_mapping).
_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def preprocessing(name: str | Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing settings of VGG ``name`` (``metadata(name)["preprocessing"]``), or a dict
    with the same keys (resize_size, crop_size, mean, std, interpolation) passed through."""
    if isinstance(name, Mapping):
        return dict(name)
    return registry.metadata(name)["preprocessing"]


# PIL modes of 16-bit grayscale: how Pillow (>= 10) opens 16-bit PNGs and TIFFs. Its 16-bit RGB(A)
# files open as RGB(A) with each sample's top byte, already right. "I" (32-bit) and "F" (float)
# have no known range: they convert as torchvision converts them (0..255, clipped).
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """``image`` with 8 bits per sample: the one decoding rule of classification, training and
    evaluation. 16-bit grayscale (a PIL image of mode "I;16", "I;16B", "I;16L" or "I;16N", or a
    uint16 array) keeps its top byte, ``v >> 8``, as Pillow itself reads 16-bit RGB PNGs; PIL's
    ``convert`` (torchvision's loader's too) clips every value above 255 instead, which turns a
    16-bit photo white. Anything else comes back as it is."""
    if isinstance(image, np.ndarray):
        return (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
    if not isinstance(image, Image.Image) or image.mode not in _16BIT_MODES:
        return image
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode or a uint8 (or uint16) (H, W), (H, W, 1|3|4)
    array; 16-bit images are scaled to 8 bits (``to_8bit``), not clipped."""
    image = to_8bit(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 or uint16 image array, got {image.dtype}; "
                            "convert with np.clip(x, 0, 255).astype(np.uint8) or pass a PIL image")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image array, "
                             f"got shape {image.shape}; channels go last (HWC)")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 HWC array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``size`` (torchvision's ``_compute_resized_output_size``:
    the longer side is truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Isotropic rescale so the shorter side is ``size`` (the paper's Q), as torchvision does."""
    h, w = resized_size(image.height, image.width, size)
    if (h, w) == (image.height, image.width):
        return image  # torchvision returns the image untouched, skipping the resampling pass
    try:
        resample = _PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; "
                         f"choose one of {', '.join(_PIL_FILTERS)}") from None
    return image.resize((w, h), resample)


def center_crop(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Central (size, size) window of an HWC array; zero-padded first when the image is smaller,
    with torchvision's offsets (``int(round((H - h) / 2))``, padding ``(h - H) // 2`` on top)."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = array.shape[:2]
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        pad = [(top, max(ch - h, 0) - top), (left, max(cw - w, 0) - left)]
        array = np.pad(array, pad + [(0, 0)] * (array.ndim - 2))
        h, w = array.shape[:2]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return array[top:top + ch, left:left + cw]


def normalize(array: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HWC -> float32 ``(x / 255 - mean) / std``, in torchvision's float32 op order."""
    x = array.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_lookup(images, mean, std, xp=np):
    """``normalize`` of uint8 (..., C) ``images`` as a table lookup, bit-identical on any backend.

    ``xp`` is the array namespace (``jax.numpy`` in the trainer, which ships uint8 batches, 4x
    less to transfer, and normalises on the device). A uint8 channel has 256 values, so a
    (256, C) table of ``normalize``'s outputs reproduces it exactly; computing it on the device
    does not, as XLA turns ``x / 255`` into ``x * (1 / 255)``, which rounds differently.
    """
    table = normalize(np.arange(256, dtype=np.uint8)[:, None], mean, std)  # (256, C)
    return xp.asarray(table)[images.astype(xp.int32), xp.arange(table.shape[1])]


def preprocess(image: Image.Image | np.ndarray, name: str | Mapping[str, Any] = "vgg16") -> np.ndarray:
    """The float32 (crop, crop, 3) HWC array VGG ``name``'s weights expect from ``image``.

    ``image`` is a PIL image (any mode) or a uint8 HWC array; see the module docstring for how
    grayscale and alpha are handled. ``name`` selects the weights' settings (``vgg16_ssd`` uses
    the SSD features weights' Caffe mean and 1/255 std); a settings dict is accepted too.
    Batch with ``np.stack([preprocess(im, name) for im in images])``.
    """
    p = preprocessing(name)
    image = resize_shorter(to_rgb(image), p["resize_size"], p.get("interpolation", "bilinear"))
    return normalize(center_crop(np.asarray(image), p["crop_size"]), p["mean"], p["std"])


def rescale(image: Image.Image | np.ndarray, size: int,
            name: str | Mapping[str, Any] = "vgg16") -> np.ndarray:
    """The whole image, shorter side rescaled to ``size`` and normalised, as float32 HWC: the
    input of dense evaluation and multi-crop at test scale Q = ``size`` (paper section 3.2)."""
    p = preprocessing(name)
    image = resize_shorter(to_rgb(image), size, p.get("interpolation", "bilinear"))
    return normalize(np.asarray(image), p["mean"], p["std"])


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image file as RGB, raising ``ValueError`` with one clear line if it cannot be read.

    EXIF orientation is applied by default so a phone photo is classified upright (torchvision's
    ``ImageFolder`` loader does not do this; pass ``exif_transpose=False`` to match it).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image PIL can read "
                         "(JPEG, PNG, BMP, GIF, TIFF, WebP ... expected)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def verification_input(image: Image.Image | np.ndarray, name: str = "vgg16",
                       channels: int = 3) -> np.ndarray:
    """The float32 (size, size, channels) input the converter verifies VGG ``name`` on.

    Three channels: ``preprocess(image, name)``; where the network's ``input_size`` is not the
    weights' crop (``vgg16_ssd``: the SSD300 detector resizes to a fixed 300x300 square), a
    square resize to ``input_size`` with the same filter and normalisation. One channel: the
    image as grayscale ("L"), same geometry, scaled to 0..1 only (one-channel VGGs have no
    published mean/std).
    """
    p = preprocessing(name)
    size = registry.metadata(name)["input_size"][0]
    image = to_rgb(image)
    if channels == 1:
        image = image.convert("L")
    interpolation = p.get("interpolation", "bilinear")
    if size != p["crop_size"]:
        a = np.asarray(image.resize((size, size), _PIL_FILTERS[interpolation]))
    else:
        a = center_crop(np.asarray(resize_shorter(image, p["resize_size"], interpolation)), size)
    a = a.reshape(a.shape[0], a.shape[1], -1)
    if channels == 1:
        return a.astype(np.float32) / np.float32(255.0)
    return normalize(a, p["mean"], p["std"])


# -- training augmentation (numpy / PIL, in the input pipeline's threads) ----------------------
def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of a uint8 (H, W), (H, W, 1) or (H, W, 3) array (no copy when contiguous);
    16-bit images (PIL or uint16) are scaled to 8 bits (``to_8bit``), channels kept."""
    image = to_8bit(image)
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def as_array(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, C) of a PIL image, C = 1 for one-channel modes."""
    a = np.asarray(image)
    return a.reshape(a.shape[0], a.shape[1], -1)


def scale_jitter_crop(image: Image.Image, scale: int, top: int, left: int, crop: int,
                      interpolation: str = "bilinear") -> Image.Image:
    """The (crop, crop) window at (top, left) of ``resize_shorter(image, scale)``.

    Only the window is resampled (PIL's ``box``: the source rectangle it covers at the same
    filter scale), 3-5x less work than resizing the whole image to S in [256, 512] and throwing
    most of it away. PIL's fixed-point filter weights are computed from the shifted origin, so a
    few pixels differ by one grey level from resize-then-crop (tests bound it at 1).
    """
    h, w = resized_size(image.height, image.width, scale)
    if not (0 <= top <= h - crop and 0 <= left <= w - crop):
        raise ValueError(f"crop window ({top}, {left}) + {crop} outside the {h}x{w} image at S={scale}")
    if (h, w) == (image.height, image.width):
        return image.crop((left, top, left + crop, top + crop))
    sy, sx = image.height / h, image.width / w
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), _PIL_FILTERS[interpolation], box=box)


def resized_crop(image: Image.Image, top: int, left: int, height: int, width: int, size: int,
                 interpolation: str = "bilinear") -> Image.Image:
    """torchvision's ``F.resized_crop`` on a PIL image: crop, then resize to (size, size)."""
    return image.crop((left, top, left + width, top + height)).resize(
        (size, size), _PIL_FILTERS[interpolation])


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's ``RandomResizedCrop.get_params`` draws them (same law,
    numpy's generator): area fraction ~ U(scale), log aspect ratio ~ U(log ratio), 10 tries, then
    the whole image clamped to the ratio range."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# AlexNet's "fancy PCA" colour shift (the VGG paper's "random RGB colour shift", section 3.1):
# eigenvalues and eigenvectors of ImageNet's RGB pixel covariance in 0..1 units, as published
# with fb.resnet.torch. A shift is ``255 * V @ (alpha * lambda)``, alpha ~ N(0, sigma^2) per image.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])


def pca_shift(alpha: np.ndarray) -> np.ndarray:
    """The per-channel RGB shift (3,) in 0..255 units for AlexNet coefficients ``alpha`` (3,)."""
    return 255.0 * (PCA_EIGVEC @ (np.asarray(alpha, np.float64) * PCA_EIGVAL))


def colour_shift(image: Image.Image, shift: np.ndarray) -> Image.Image:
    """``clip(round(x + shift[c]), 0, 255)`` for every pixel of an RGB image, per channel c.

    The shift is constant over the image, so it is a 256-entry lookup table per channel
    (``Image.point``): one pass in C, no float copy of the image.
    """
    x = np.arange(256, dtype=np.float64)
    lut = np.clip(np.round(x[None, :] + np.asarray(shift, np.float64)[:, None]), 0, 255)
    return image.point(lut.astype(np.uint8).ravel().tolist())
