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
``preprocess(img, name)`` equals ``transforms(img.convert("RGB"))`` for every PIL mode.
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


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode or a uint8 (H, W), (H, W, 1|3|4) array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image array, got {image.dtype}; "
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
