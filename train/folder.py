"""Your own images: torchvision's ``ImageFolder`` layout as a grain source.

    ROOT/<split>/<class>/<image>          e.g. photos/train/cat/001.jpg, photos/val/dog/x.png

Class indices are the sorted class-folder names of the training split, exactly as torchvision's
``ImageFolder`` assigns them (``find_classes``: every sub-directory, sorted by name; images found
by ``os.walk`` in sorted order, following links). The evaluation split is indexed with the
training split's classes, so a class missing from ``val`` does not shift the others. Files are
those whose extension a PIL decoder claims (JPEG, PNG, BMP, GIF, TIFF, WebP, ...; torchvision
takes nine of them); every image becomes RGB (grayscale replicated, palette expanded, alpha
dropped, 16-bit scaled to 8) with its EXIF orientation applied, as ``python -m
vgg_flax.classify`` reads photos (``vgg_flax.images.to_rgb``).

A file that cannot be decoded never stops a run: it is reported once by path (with the running
count), and its slot takes the next readable image of the split (training) or is masked out of
the metrics (evaluation, ``ok`` False). An empty root, a split with no class folders or a class
with no images is a ``DataError`` (one line; the trainer exits 2).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from vgg_flax.images import to_rgb

log = logging.getLogger("vgg_flax.train")


class DataError(ValueError):
    """A dataset that cannot be read as configured (one line: problem and fix)."""


def image_extensions() -> tuple[str, ...]:
    """Lower-case extensions of every format PIL can open (not the save-only ones)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN))


def find_classes(directory: str | os.PathLike) -> list[str]:
    """torchvision's ``find_classes``: every sub-directory name, sorted."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def make_samples(directory: str | os.PathLike, classes: list[str],
                 extensions: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) in torchvision's ``make_dataset`` order, and the classes that have a
    folder here but no image in it."""
    samples, empty = [], []
    for index, name in enumerate(classes):
        target = os.path.join(directory, name)
        if not os.path.isdir(target):
            continue  # a class absent from this split: no images, nothing shifts
        before = len(samples)
        for root, _, fnames in sorted(os.walk(target, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(extensions):
                    samples.append((os.path.join(root, fname), index))
        if len(samples) == before:
            empty.append(name)
    return samples, empty


@functools.lru_cache(maxsize=None)
def _formats(extension: str) -> tuple[str, ...] | None:
    """The PIL format an extension names (``".jpg"`` -> ``("JPEG",)``); None: try them all.
    Opening a JPEG with all ~40 of PIL's formats registered costs 0.19 ms, with its own 0.09:
    3% of the training transform's time per image."""
    fmt = Image.registered_extensions().get(extension.lower())
    return (fmt,) if fmt in Image.OPEN else None


def decode(path: str, draft: int | None = None) -> Image.Image:
    """The RGB image in ``path``, upright. ``draft``: let the JPEG decoder scale by 1/2, 1/4 or
    1/8 while decoding, as long as the shorter side stays >= ``draft`` (several times faster on
    camera-size photos; pixels then differ from a full decode and resize)."""
    try:  # the extension's decoder first: PIL would try every registered format in turn
        im = Image.open(path, formats=_formats(os.path.splitext(path)[1]))
    except UnidentifiedImageError:  # a file whose extension names another format
        im = Image.open(path)
    with im:
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        im.load()
        # in place: without an orientation tag exif_transpose would return a copy of the whole
        # decoded image (~12% of a 500x375 JPEG's decode time)
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb(im)  # 16-bit scaled as classify reads it


class SkipLog:
    """The files of a split that could not be decoded (thread-safe: grain reads in threads)."""

    def __init__(self, split: str):
        self.split, self.paths, self._lock = split, {}, threading.Lock()

    def add(self, path: str, error: BaseException) -> None:
        with self._lock:
            if path in self.paths:
                return
            self.paths[path] = f"{type(error).__name__}: {error}"
            n = len(self.paths)
        log.warning("%s: skipped %s: cannot decode it (%s); %d undecodable file(s) in this "
                    "split so far", self.split, path, str(error).splitlines()[0][:120] if
                    str(error) else type(error).__name__, n)

    def __len__(self) -> int:
        return len(self.paths)


class FolderSource:
    """Random-access ``{"image": PIL RGB image, "label": int, "ok": bool}`` of one split.

    ``classes``: the class names indices refer to (default: this split's own class folders).
    ``substitute``: a slot whose file cannot be decoded takes the next readable file (training:
    every batch stays full); without it, the slot keeps its own label, a black image, ``ok``
    False (evaluation: masked out).
    """
    channels = 3

    def __init__(self, root: str | os.PathLike, split: str, classes: list[str] | None = None,
                 draft: int | None = None, substitute: bool = True):
        root = Path(root)
        directory = root / split
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not a directory; point --config.data_dir at "
                            "ROOT holding ROOT/<split>/<class>/<image>")
        if not directory.is_dir():
            present = sorted(e.name for e in os.scandir(root) if e.is_dir())
            raise DataError(f"no split folder {directory} (ROOT holds: {', '.join(present) or 'nothing'}); "
                            "lay images out as ROOT/<split>/<class>/<image> or set "
                            "--config.train_split / --config.eval_split")
        own = find_classes(directory)
        if not own:
            raise DataError(f"{directory} has no class folders; put each class's images in "
                            f"{directory}/<class name>/")
        classes = list(classes) if classes is not None else own
        unknown = sorted(set(own) - set(classes))
        if unknown:
            raise DataError(f"{directory} has class folders the training split lacks: "
                            f"{', '.join(unknown[:5])}; every class needs training images")
        self.samples, empty = make_samples(directory, classes, image_extensions())
        if empty:
            raise DataError(f"class folder(s) with no images in {directory}: "
                            f"{', '.join(empty[:5])}; add images or remove the folder(s)")
        self.root, self.split, self.classes = root, split, classes
        self.num_classes = len(classes)
        self.draft, self.substitute = draft, substitute
        self.skipped = SkipLog(split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not 0 <= index < n:
            raise IndexError(f"index {index} outside the {n} files of {self.root / self.split}")
        for k in range(n if self.substitute else 1):
            path, label = self.samples[(index + k) % n]
            try:
                return {"image": decode(path, self.draft), "label": label, "ok": True}
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self.skipped.add(path, e)
        if not self.substitute:
            return {"image": Image.new("RGB", (1, 1)), "label": self.samples[index][1],
                    "ok": False}
        raise DataError(f"no file in {self.root / self.split} could be decoded; check the "
                        "images open in an image viewer")


def sources(config, split: str, substitute: bool = True) -> FolderSource:
    """The ``split`` of ``config.data_dir``, indexed by the training split's classes."""
    root = config.get("data_dir")
    if not root:
        raise DataError("dataset 'folder' needs --config.data_dir=ROOT (images in "
                        "ROOT/<split>/<class>/<image>)")
    train_dir = Path(root) / config.get("train_split", "train")
    classes = None
    if split != config.get("train_split", "train") and train_dir.is_dir():
        classes = find_classes(train_dir)
    draft = config.input.get("draft", False) if "input" in config else False
    size = None
    if draft:
        # The smallest side any transform needs: the largest training scale or the eval resize.
        size = max(config.input.scale_max, config.input.resize_size, config.input.crop_size)
    return FolderSource(root, split, classes, draft=size, substitute=substitute)
