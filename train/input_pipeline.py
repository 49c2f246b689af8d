"""Input: TFDS data sources read with grain (no TensorFlow at training time), split per process.

Every dataset is a random-access source of ``{"image": uint8 HWC, "label": int}``:
``tfds.data_source(name)`` for any TFDS image-classification dataset (prepared as array_record),
or an in-memory source registered in ``IN_MEMORY`` (``digits``: scikit-learn's handwritten digits).
Both flow through the same grain graph:

    source -> global shuffle (seed, reshuffled every epoch) -> repeat -> random augmentation
    (per-example RNG from the seed and the example's global position) -> this process's rows of
    each global batch -> batch -> prefetching iterator (its state goes in the checkpoint)

The global order is a function of the seed alone, so 1 process x 4 devices and 2 processes x 2
devices see the same global batches, and a resumed run reads what the uninterrupted one would.
Images stay uint8 until they are on the device (4x less to transfer); normalisation is on device.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image


class DataError(ValueError):
    """A dataset that cannot be read as configured (one line: problem and fix)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    train_size: int
    eval_size: int


# -- sources ----------------------------------------------------------------------------------
class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, 0..16) as uint8 images, a fixed 80/20
    stratified split (seed 0) so the test set is always the same 360 images."""
    num_classes, channels = 10, 1

    def __init__(self, split: str):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        if split not in ("train", "test"):
            raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
        d = load_digits()
        images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
        idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=0.2,
                                               random_state=0, stratify=d.target)
        idx = idx_train if split == "train" else idx_test
        self._images, self._labels = images[idx], d.target[idx].astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self._images[i], "label": self._labels[i]}


# Names that do not go through TFDS; everything else is looked up with tfds.data_source.
IN_MEMORY: dict[str, Callable[[str], Any]] = {"digits": DigitsSource}


def _tfds_source(name: str, split: str, data_dir: str | None, manual_dir: str | None,
                 download: bool):
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as first:  # not prepared (or not array_record) in data_dir
        if isinstance(first, (KeyError, ValueError)) and "split" in str(first).lower():
            raise DataError(f"{name} has no split {split!r}: {str(first).splitlines()[0]}; "
                            "set --config.train_split / --config.eval_split") from first
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:
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
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(
                f"could not download and prepare {name} ({type(e).__name__}: {msg}); on a "
                f"machine with network run `tfds build {name} --file_format=array_record "
                f"--data_dir=D` and pass --config.data_dir=D") from e


def get_source(config, split: str):
    """The random-access source for ``config.dataset``'s ``split``."""
    if config.dataset in IN_MEMORY:
        return IN_MEMORY[config.dataset](split)
    return _tfds_source(config.dataset, split, config.get("data_dir"),
                        config.get("manual_dir"), config.get("download", True))


def dataset_info(config, train_source, eval_source) -> DatasetInfo:
    if config.dataset in IN_MEMORY:
        cls = type(train_source)
        return DatasetInfo(cls.num_classes, cls.channels, len(train_source), len(eval_source))
    features = train_source.dataset_info.features
    label = features[config.get("label_key", "label")]
    image = features[config.get("image_key", "image")]
    if not hasattr(label, "num_classes") or len(image.shape) != 3:
        raise DataError(f"{config.dataset} is not an image-classification dataset (needs an "
                        "image and a ClassLabel); set --config.image_key / --config.label_key")
    return DatasetInfo(label.num_classes, image.shape[-1], len(train_source), len(eval_source))


# -- transforms (numpy / PIL, run in grain's reader threads) -----------------------------------
def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[:2] == (h, w):
        return img
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = size / min(h, w)
    return _resize(img, max(size, round(h * s)), max(size, round(w * s)))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


# AlexNet's "fancy PCA" colour shift (the VGG paper's "random RGB colour shift"): eigenvalues and
# eigenvectors of ImageNet's RGB pixel covariance, in 0..1 units (as in fb.resnet.torch).
_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                        [-0.5808, -0.0045, -0.8140],
                        [-0.5836, -0.6948, 0.4203]])


def _example(ex: dict[str, Any], image_key: str, label_key: str) -> tuple[np.ndarray, int]:
    img = np.asarray(ex[image_key])
    if img.ndim == 2:
        img = img[..., None]
    return img, int(ex[label_key])


def make_train_transform(cfg) -> Callable[[dict[str, Any], np.random.Generator], dict]:
    """``cfg`` is ``config.input``: kind "scale_jitter" (the paper: shorter side S uniform in
    [scale_min, scale_max], random crop) or "random_resized_crop"; optional flip and colour shift."""
    kind, crop = cfg.train_kind, cfg.crop_size
    ik, lk = cfg.image_key, cfg.label_key

    def transform(ex, rng: np.random.Generator):
        img, label = _example(ex, ik, lk)
        if kind == "scale_jitter":
            img = resize_shorter(img, int(rng.integers(cfg.scale_min, cfg.scale_max + 1)))
            h, w = img.shape[:2]
            top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            img = img[top:top + crop, left:left + crop]
        elif kind == "random_resized_crop":
            img = _random_resized_crop(img, crop, rng)
        else:
            raise DataError(f"unknown input.train_kind {kind!r}; use scale_jitter or random_resized_crop")
        if cfg.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        if cfg.colour_shift > 0 and img.shape[-1] == 3:
            alpha = rng.normal(0.0, cfg.colour_shift, 3)
            shift = 255.0 * (_PCA_EIGVEC @ (alpha * _PCA_EIGVAL))
            img = np.clip(img.astype(np.float32) + shift, 0, 255).round().astype(np.uint8)
        return {"image": np.ascontiguousarray(img), "label": np.int32(label)}

    return transform


def _random_resized_crop(img, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(area * r)), round(np.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(img[top:top + ch, left:left + cw], size, size)
    return center_crop(resize_shorter(img, size), size)


def make_eval_transform(cfg) -> Callable[[dict[str, Any]], dict]:
    ik, lk = cfg.image_key, cfg.label_key

    def transform(ex):
        img, label = _example(ex, ik, lk)
        img = center_crop(resize_shorter(img, cfg.resize_size), cfg.crop_size)
        return {"image": np.ascontiguousarray(img), "label": np.int32(label)}

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
        ex["mask"] = np.float32(real)
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
    return ds.to_iter_dataset(_read_options(config))
