"""Input: TFDS data sources read with grain (no TensorFlow at training time), split per process.

Every dataset is a random-access source of ``{"image": uint8 HWC or PIL image, "label": int}``:
``tfds.data_source(name)`` for any TFDS image-classification dataset (prepared as array_record),
or a local source registered in ``IN_MEMORY`` (``digits``: scikit-learn's handwritten digits;
``folder``: your own images in torchvision's ImageFolder layout, see ``train/folder.py``).
All flow through the same grain graph:

    source -> global shuffle (seed, reshuffled every epoch) -> repeat -> random augmentation
    (per-example RNG from the seed and the example's global position) -> this process's rows of
    each global batch -> batch -> prefetching iterator (its state goes in the checkpoint)

The global order is a function of the seed alone, so 1 process x 4 devices and 2 processes x 2
devices see the same global batches, and a resumed run reads what the uninterrupted one would.
Images stay uint8 until they are on the device (4x less to transfer); normalisation is on device
(``vgg_flax.images.normalize_lookup``). Every resize, crop and colour shift is
``vgg_flax.images``', so the evaluation input is torchvision's, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from train import folder
from train.folder import DataError
from vgg_flax.images import (as_array, as_pil, center_crop, colour_shift, pca_shift,
                                 random_resized_crop_params, resize_shorter, resized_crop,
                                 resized_size, scale_jitter_crop)

log = logging.getLogger("vgg_flax.train")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    train_size: int
    eval_size: int
    class_names: tuple[str, ...] = ()  # folder datasets: index -> class folder name


# -- sources ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) in 0..16 and labels (1797,), read-only, read
    once per process (both splits share it) from the CSV that scikit-learn ships, without
    importing scikit-learn (its import costs 1-3 s, the bulk of the demo's data loading);
    through ``sklearn.datasets.load_digits`` if that file moved."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sklearn_digits
        d = sklearn_digits()
        images, labels = d.images, d.target
    else:
        data = np.loadtxt(path, delimiter=",")
        images, labels = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    for a in (images, labels):
        a.flags.writeable = False
    return images, labels


class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, 0..16) as uint8 images, a fixed 80/20
    stratified split so the test set is always the same 360 images: scikit-learn's
    ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``, stored in
    ``train/digits_split.json`` (tests/test_augment.py recomputes it)."""
    num_classes, channels = 10, 1
    SPLIT_FILE = Path(__file__).with_name("digits_split.json")

    def __init__(self, split: str):
        if split not in ("train", "test"):
            raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
        images, labels = load_digits()
        images = np.round(images * (255 / 16)).astype(np.uint8)[..., None]
        idx = np.asarray(json.loads(self.SPLIT_FILE.read_text())[split])
        self._images, self._labels = images[idx], labels[idx].astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self._images[i], "label": self._labels[i]}


def _folder_source(config, split: str):
    # The evaluation split masks an undecodable file out; training substitutes the next file.
    return folder.sources(config, split, substitute=split == config.get("train_split", "train"))


# Names that do not go through TFDS (called with (config, split)); everything else is looked up
# with tfds.data_source.
IN_MEMORY: dict[str, Callable[[Any, str], Any]] = {
    "digits": lambda config, split: DigitsSource(split),
    "folder": _folder_source,
}


def _tfds_source(name: str, split: str, data_dir: str | None, manual_dir: str | None,
                 download: bool):
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # not prepared (RuntimeError: not array_record), unknown name or split (ValueError, KeyError),
    # files missing (OSError) or an incomplete preparation (AssertionError) in data_dir
    except (ValueError, KeyError, RuntimeError, OSError, AssertionError) as first:
        if isinstance(first, (KeyError, ValueError)) and "split" in str(first).lower():
            raise DataError(f"{name} has no split {split!r}: {str(first).splitlines()[0]}; "
                            "set --config.train_split / --config.eval_split") from first
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError as e:
            raise DataError(f"unknown dataset {name!r}: not 'digits' nor a TFDS dataset "
                            "(see tfds.list_builders())") from e
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not (
                manual_dir and os.path.isdir(manual_dir)):
            raise DataError(
                f"{name} is not prepared in {builder.data_dir} and needs its archives: set "
                f"--config.manual_dir=DIR to the directory holding them (for imagenet2012: "
                f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)") from first
        if not download:
            raise DataError(f"{name} is not prepared in {builder.data_dir}; prepare it with "
                            f"`tfds build {name} --file_format=array_record` or set "
                            "--config.download=True") from first
        try:
            kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
            return tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                                    builder_kwargs={"file_format": "array_record"},
                                    download_and_prepare_kwargs=kwargs)
        except Exception as e:  # noqa: BLE001 - last resort: TFDS's download and preparation
            # fail in many library-specific types (network, checksums, TensorFlow's OpError,
            # Beam); every one gets the same fix, so the run stops with that one line
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(
                f"could not download and prepare {name} ({type(e).__name__}: {msg}); on a "
                f"machine with network run `tfds build {name} --file_format=array_record "
                f"--data_dir=D` and pass --config.data_dir=D") from e


def get_source(config, split: str):
    """The random-access source for ``config.dataset``'s ``split``."""
    if config.dataset in IN_MEMORY:
        return IN_MEMORY[config.dataset](config, split)
    return _tfds_source(config.dataset, split, config.get("data_dir"),
                        config.get("manual_dir"), config.get("download", True))


def dataset_info(config, train_source, eval_source) -> DatasetInfo:
    if config.dataset in IN_MEMORY:
        return DatasetInfo(train_source.num_classes, train_source.channels, len(train_source),
                           len(eval_source), tuple(getattr(train_source, "classes", ())))
    features = train_source.dataset_info.features
    label = features[config.get("label_key", "label")]
    image = features[config.get("image_key", "image")]
    if not hasattr(label, "num_classes") or len(image.shape) != 3:
        raise DataError(f"{config.dataset} is not an image-classification dataset (needs an "
                        "image and a ClassLabel); set --config.image_key / --config.label_key")
    return DatasetInfo(label.num_classes, image.shape[-1], len(train_source), len(eval_source))


# -- transforms (PIL, run in grain's reader threads; PIL releases the GIL) ---------------------
def _example(ex: dict[str, Any], image_key: str, label_key: str) -> tuple[Image.Image, int]:
    return as_pil(ex[image_key] if isinstance(ex[image_key], Image.Image)
                    else np.asarray(ex[image_key])), int(ex[label_key])


def make_train_transform(cfg) -> Callable[[dict[str, Any], np.random.Generator], dict]:
    """``cfg`` is ``config.input``. ``scale_jitter`` is the paper's (section 3.1): the shorter side
    rescaled to S ~ U{scale_min..scale_max} (``images.resize_shorter``'s geometry), a random
    crop_size crop; ``random_resized_crop`` is torchvision's. Then a horizontal flip with
    probability 1/2 (``flip``) and AlexNet's PCA colour shift with alpha ~ N(0, colour_shift^2)."""
    kind, crop = cfg.train_kind, cfg.crop_size
    ik, lk = cfg.image_key, cfg.label_key

    def transform(ex, rng: np.random.Generator):
        img, label = _example(ex, ik, lk)
        if kind == "scale_jitter":
            s = int(rng.integers(cfg.scale_min, cfg.scale_max + 1))
            h, w = resized_size(img.height, img.width, s)
            top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            img = scale_jitter_crop(img, s, top, left, crop)
        elif kind == "random_resized_crop":
            img = resized_crop(img, *random_resized_crop_params(img.height, img.width, rng),
                                 crop)
        else:
            raise DataError(f"unknown input.train_kind {kind!r}; use scale_jitter or random_resized_crop")
        if cfg.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if cfg.colour_shift > 0 and img.mode == "RGB":
            img = colour_shift(img, pca_shift(rng.normal(0.0, cfg.colour_shift, 3)))
        return {"image": as_array(img), "label": np.int32(label)}

    return transform


def make_eval_transform(cfg) -> Callable[[dict[str, Any]], dict]:
    """torchvision's evaluation geometry (``images.resize_shorter`` to resize_size, then
    ``images.center_crop``) on uint8; the device applies ``images.normalize_lookup``."""
    ik, lk = cfg.image_key, cfg.label_key

    def transform(ex):
        img, label = _example(ex, ik, lk)
        img = as_array(resize_shorter(img, cfg.resize_size))
        out = {"image": np.ascontiguousarray(center_crop(img, cfg.crop_size)),
               "label": np.int32(label)}
        if not ex.get("ok", True):
            out["ok"] = False
        return out

    return transform


# -- per-process share of global batches -------------------------------------------------------
class ProcessShare(grain.MapDataset):
    """Rows ``[p*local, (p+1)*local)`` of every global batch of ``parent``: process p reads only
    its own examples, and the global batch does not depend on the number of processes."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local)
        return self._parent[step * self._global + self._offset + row]


class _Padded(grain.MapDataset):
    """``parent`` padded with copies of its first element (mask 0) to a multiple of ``multiple``,
    so evaluation covers every example with the same number of steps on every host."""

    def __init__(self, parent: grain.MapDataset, multiple: int):
        super().__init__(parent)
        self._n = len(parent)
        self._len = -(-self._n // multiple) * multiple

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        real = index < self._n
        ex = dict(self._parent[index if real else 0])
        ok = ex.pop("ok", True)  # an undecodable file counts for nothing
        ex["mask"] = np.float32(real and ok)
        return ex


def _read_options(config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.input.num_threads,
                             prefetch_buffer_size=config.input.prefetch)


def train_dataset(config, source, process_index: int, process_count: int) -> grain.IterDataset:
    """Infinite iterator dataset of this process's batches ``{"image": (B, H, W, C) uint8,
    "label": (B,) int32}``, B = batch_size / process_count."""
    ds = (grain.MapDataset.source(source).shuffle(seed=config.seed).repeat(None)
          .random_map(make_train_transform(config.input), seed=config.seed))
    ds = ProcessShare(ds, config.batch_size, process_index, process_count)
    ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
    return ds.to_iter_dataset(_read_options(config))


def eval_dataset(config, source, process_index: int, process_count: int) -> grain.IterDataset:
    """One pass over the eval split in a fixed order, padded (``mask`` 0) to whole global batches."""
    gb = config.eval_batch_size
    ds = grain.MapDataset.source(source).map(make_eval_transform(config.input))
    ds = ProcessShare(_Padded(ds, gb), gb, process_index, process_count)
    ds = ds.batch(gb // process_count, drop_remainder=True)
    ds = ds.to_iter_dataset(_read_options(config))
    return _ReportSkipped(ds, source) if hasattr(source, "skipped") else ds


class _ReportSkipped:
    """Iterates ``ds``; after each full pass, logs how many files of ``source`` were undecodable,
    so the end of a run (which always evaluates) states the count."""

    def __init__(self, ds, source):
        self._ds, self._source = ds, source

    def __iter__(self):
        yield from self._ds
        if len(self._source.skipped):
            log.warning("%s: %d undecodable file(s) skipped and masked out of this evaluation "
                        "(paths in the warnings above)", self._source.split,
                        len(self._source.skipped))
