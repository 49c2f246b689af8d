"""The paper's test protocols (Simonyan & Zisserman, sections 3.2 and 4.1-4.3) as functions.

- ``single``: torchvision's protocol, one center crop (resize 256, crop 224); reproduces the
  accuracy torchvision publishes for its weights.
- ``dense``: the whole image, shorter side rescaled to Q, through the network with fc6-fc8 as
  convolutions (``vgg_flax.create(name, dense=True)``, same variables); the class score map is
  averaged over space, and the softmax posteriors of the image and its mirror image are averaged
  (section 3.2). One test scale: Q = S, or (S_min + S_max) / 2 for scale-jittered training (4.1).
- ``multiscale``: dense at Q in {S - 32, S, S + 32}, or {S_min, (S_min + S_max) / 2, S_max} for
  jittered training, posteriors averaged over scales (section 4.2).
- ``multicrop``: at each Q, a 5x5 regular grid of crop_size crops and their mirror images
  (50 crops per scale, 150 at three scales), each through the standard network, posteriors
  averaged (section 4.3).
- ``dense+multicrop``: the average of the dense and multi-crop posteriors (section 4.3, Table 5).

Every protocol reduces an image to a list of ``Row``s (one network input each, with the weight
of its posterior in the image's final posterior); ``Evaluator`` batches rows of equal shape,
runs them sharded over a device mesh, and sums the weighted posteriors per image.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from vgg_flax.model import VGG
from vgg_flax.preprocess import preprocess, preprocessing, rescale, to_rgb

PROTOCOLS = ("single", "dense", "multiscale", "multicrop", "dense+multicrop")
CROP, DENSE = "crop", "dense"  # the two ways a row goes through the network


# -- scales and crops -----------------------------------------------------------------------------
def test_scales(train_scale: int | Sequence[int]) -> tuple[int, int, int]:
    """The three test scales Q of section 4.2 for training scale S (an int) or jittered
    [S_min, S_max] (a pair): {S - 32, S, S + 32} or {S_min, (S_min + S_max) / 2, S_max}."""
    if isinstance(train_scale, int):
        return train_scale - 32, train_scale, train_scale + 32
    lo, hi = train_scale
    return lo, (lo + hi) // 2, hi


def single_scale(train_scale: int | Sequence[int]) -> int:
    """The one test scale of section 4.1: Q = S, or (S_min + S_max) / 2 when jittered."""
    return train_scale if isinstance(train_scale, int) else (train_scale[0] + train_scale[1]) // 2


def grid_offsets(size: int, crop: int, n: int = 5) -> list[int]:
    """``n`` evenly spaced crop starts from 0 to ``size - crop``, rounded half up."""
    if crop > size:
        raise ValueError(f"a {crop}-pixel crop does not fit in a {size}-pixel side; "
                         "test scales must be at least the crop size")
    d = size - crop
    return [(2 * i * d + n - 1) // (2 * (n - 1)) if n > 1 else d // 2 for i in range(n)]


def multicrop(image: np.ndarray, crop: int = 224, grid: int = 5, flip: bool = True) -> np.ndarray:
    """(grid * grid * (1 + flip), crop, crop, C) crops of one HWC image: the grid row by row
    (top-left first), then the same crops mirrored left-right."""
    ys, xs = grid_offsets(image.shape[0], crop, grid), grid_offsets(image.shape[1], crop, grid)
    crops = np.stack([image[y:y + crop, x:x + crop] for y in ys for x in xs])
    return np.concatenate([crops, crops[:, :, ::-1]]) if flip else crops


# -- protocols: an image -> weighted network inputs -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One network input: ``kind`` is CROP (standard head) or DENSE (fully convolutional, whole
    image, flip-averaged if the evaluator flips); ``weight`` is its share of the final posterior."""
    kind: str
    array: np.ndarray  # float32 HWC
    weight: float

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.kind, self.array.shape


def rows(image: Image.Image | np.ndarray, protocol: str, name: str | Mapping[str, Any] = "vgg16",
         scales: Sequence[int] | None = None, crop_size: int | None = None,
         resize_size: int | None = None) -> list[Row]:
    """The network inputs ``protocol`` makes of one image, weights summing to 1.

    ``scales``: the test scales Q (``single_scale(S)`` for ``dense``, ``test_scales(S)`` for the
    others; ignored by ``single``). ``crop_size``/``resize_size`` default to the weights'
    preprocessing (224/256 for ImageNet weights).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    p = preprocessing(name)
    crop = crop_size or p["crop_size"]
    if protocol == "single":
        p = dict(p, crop_size=crop, resize_size=resize_size or p["resize_size"])
        return [Row(CROP, preprocess(image, p), 1.0)]
    if not scales:
        raise ValueError(f"protocol {protocol!r} needs test scales (e.g. test_scales(256))")
    image = to_rgb(image)
    both = protocol == "dense+multicrop"
    out: list[Row] = []
    for q in scales:
        x = rescale(image, q, p)
        if protocol in ("dense", "multiscale") or both:
            out.append(Row(DENSE, x, (0.5 if both else 1.0) / len(scales)))
        if protocol == "multicrop" or both:
            crops = multicrop(x, crop)
            w = (0.5 if both else 1.0) / (len(scales) * len(crops))
            out.extend(Row(CROP, c, w) for c in crops)
    return out


# -- the network side -------------------------------------------------------------------------------
def posterior_fns(module: VGG, flip: bool = True) -> dict[str, Callable[[Any, jax.Array], jax.Array]]:
    """``{CROP: f, DENSE: g}``, each (variables, (B, H, W, C)) -> (B, num_classes) softmax
    posteriors. ``g`` runs the same variables fully convolutionally and, with ``flip``, averages
    the posteriors of the batch and its mirror image (section 3.2)."""
    if module.head != "fc" or not module.include_top:
        raise ValueError("evaluation needs a classifier (head='fc', include_top=True); "
                         f"got head={module.head!r}, include_top={module.include_top}")
    standard = module.clone(dense=False, taps=())
    dense = module.clone(dense=True, taps=())

    def crop_fn(variables, x):
        return jax.nn.softmax(standard.apply(variables, x).astype(jnp.float32), axis=-1)

    def dense_fn(variables, x):
        p = jax.nn.softmax(dense.apply(variables, x).astype(jnp.float32), axis=-1)
        if flip:
            p = 0.5 * (p + jax.nn.softmax(
                dense.apply(variables, x[:, :, ::-1]).astype(jnp.float32), axis=-1))
        return p

    return {CROP: crop_fn, DENSE: dense_fn}


def local_mesh() -> Mesh:
    """A 1-D 'data' mesh over this process's devices.

    Evaluation needs no communication between images, and dense evaluation feeds whole images
    whose shapes differ from host to host, so each process runs its own share of the data on its
    own devices; only the final counts are summed across processes (``allreduce_counts``).
    """
    return Mesh(np.array(jax.local_devices()), ("data",))


class Evaluator:
    """Batches rows of equal (kind, shape) over images, runs them sharded, yields final posteriors.

    ``batch_size`` rows per network call, rounded up to a multiple of the mesh size; a partial
    batch is padded with copies of its last row (their results are dropped). Dense rows of
    different image shapes go to different batches (exact dense evaluation cannot pad an image);
    each new shape compiles once. At most ``max_pending`` rows wait in partly filled batches before
    the fullest is run anyway, which bounds memory.
    """

    def __init__(self, module: VGG, variables: Any, *, flip: bool = True, batch_size: int = 32,
                 mesh: Mesh | None = None, max_pending: int = 2048):
        self.mesh = mesh or local_mesh()
        n = self.mesh.size
        self.batch_size = max(n, -(-batch_size // n) * n)
        self.max_pending = max(max_pending, self.batch_size)
        self.data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.variables = jax.device_put(variables, replicated)
        self._fns = {k: jax.jit(f, in_shardings=(replicated, self.data), out_shardings=self.data)
                     for k, f in posterior_fns(module, flip).items()}
        self.calls = 0  # network calls made (for reports and tests)

    def _run(self, kind: str, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n < self.batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, 0)])
        self.calls += 1
        out = self._fns[kind](self.variables, jax.device_put(batch, self.data))
        return np.asarray(out)[:n]

    def __call__(self, items: Iterable[tuple[Hashable, list[Row]]]
                 ) -> Iterator[tuple[Hashable, np.ndarray]]:
        """(image id, rows) in -> (image id, posterior (num_classes,)) out, in completion order."""
        buckets: dict[tuple, list[tuple[Hashable, Row]]] = defaultdict(list)
        remaining: dict[Hashable, int] = {}
        total: dict[Hashable, np.ndarray] = {}
        pending = 0

        def flush(key):
            nonlocal pending
            bucket = buckets.pop(key)
            pending -= len(bucket)
            post = self._run(key[0], np.stack([r.array for _, r in bucket]))
            for (image_id, row), p in zip(bucket, post):
                acc = total.get(image_id)
                total[image_id] = row.weight * p.astype(np.float64) + (0 if acc is None else acc)
                remaining[image_id] -= 1
                if remaining[image_id] == 0:
                    del remaining[image_id]
                    yield image_id, total.pop(image_id).astype(np.float32)

        for image_id, image_rows in items:
            if image_id in remaining:
                raise ValueError(f"image id {image_id!r} given twice")
            remaining[image_id] = len(image_rows)
            for row in image_rows:
                buckets[row.key].append((image_id, row))
                pending += 1
                if len(buckets[row.key]) == self.batch_size:
                    yield from flush(row.key)
            while pending > self.max_pending:
                yield from flush(max(buckets, key=lambda k: len(buckets[k])))
        for key in sorted(buckets, key=lambda k: -len(buckets[k])):
            yield from flush(key)


def evaluate_image(image: Image.Image | np.ndarray, module: VGG, variables: Any,
                   protocol: str = "single", name: str | Mapping[str, Any] = "vgg16",
                   scales: Sequence[int] | None = None, flip: bool = True,
                   crop_size: int | None = None) -> np.ndarray:
    """Posterior (num_classes,) of one image under ``protocol`` (see ``rows``), on one device."""
    mesh = Mesh(np.array(jax.local_devices()[:1]), ("data",))
    ev = Evaluator(module, variables, flip=flip, batch_size=50, mesh=mesh)
    [(_, post)] = list(ev([(0, rows(image, protocol, name, scales, crop_size))]))
    return post


# -- scoring ----------------------------------------------------------------------------------------
def topk_correct(posteriors: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
                 ) -> dict[int, int]:
    """How many of ``labels`` (N,) are among the k highest ``posteriors`` (N, K), for each k."""
    posteriors, labels = np.asarray(posteriors), np.asarray(labels)
    # rank of the true class = number of classes scored strictly higher (ties count in its favour)
    true = np.take_along_axis(posteriors, labels[:, None], axis=1)
    rank = (posteriors > true).sum(axis=1)
    return {k: int((rank < k).sum()) for k in ks}


def allreduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Sum integer counts over all processes (a no-op with one process)."""
    if jax.process_count() == 1:
        return dict(counts)
    from jax.experimental import multihost_utils
    keys = sorted(counts)
    local = np.array([counts[k] for k in keys], np.int64)
    summed = multihost_utils.process_allgather(local).sum(axis=0)
    return {k: int(v) for k, v in zip(keys, summed)}


def error_table(rows_: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table in the form of the paper's Tables 3-5."""
    head = ("ConvNet config", "protocol", "train (S)", "test (Q)", "images",
            "top-1 val. error (%)", "top-5 val. error (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows_:
        cells = (r["model"], r["protocol"], r["train_scale"], r["test_scales"], str(r["images"]),
                 f"{r['top1_error']:.1f}", f"{r['top5_error']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
