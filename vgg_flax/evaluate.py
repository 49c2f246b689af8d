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
of its posterior in the image's final posterior); ``Evaluator`` batches rows of equal shape
(dense images: equal size rounded up to 32, zero-padded and masked so the result is exactly the
unpadded image's), runs them sharded over a device mesh, and sums the weighted posteriors per
image. ``evaluate_source`` does this over a dataset, each process reading only its share.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from vgg_flax.model import VGG
from vgg_flax.images import preprocess, preprocessing, rescale, to_rgb

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


def crop_windows(image: np.ndarray, crop: int = 224, grid: int = 5, flip: bool = True
                 ) -> list[np.ndarray]:
    """The multi-crop windows of one HWC image as views (no copies): the grid row by row
    (top-left first), then the same windows mirrored left-right."""
    ys, xs = grid_offsets(image.shape[0], crop, grid), grid_offsets(image.shape[1], crop, grid)
    crops = [image[y:y + crop, x:x + crop] for y in ys for x in xs]
    return crops + [c[:, ::-1] for c in crops] if flip else crops


def multicrop(image: np.ndarray, crop: int = 224, grid: int = 5, flip: bool = True) -> np.ndarray:
    """(grid * grid * (1 + flip), crop, crop, C) crops of one HWC image (see ``crop_windows``)."""
    return np.stack(crop_windows(image, crop, grid, flip))


# -- protocols: an image -> weighted network inputs -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One network input: ``kind`` is CROP (standard head) or DENSE (fully convolutional, whole
    image, flip-averaged if the evaluator flips); ``weight`` is its share of the final posterior."""
    kind: str
    array: np.ndarray  # float32 HWC (may be a view into a rescaled image)
    weight: float

    def key(self, stride: int) -> tuple[str, tuple[int, ...]]:
        """Rows with the same key share a batch: crops by shape, dense images by padded shape."""
        shape = self.array.shape
        return self.kind, (padded_shape(shape, stride) if self.kind == DENSE else shape)


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
    if min(scales) < crop:
        raise ValueError(f"test scale Q={min(scales)} is smaller than the {crop}-pixel crop "
                         "the network was trained on; use scales >= the crop size")
    image = to_rgb(image)
    both = protocol == "dense+multicrop"
    out: list[Row] = []
    for q in scales:
        x = rescale(image, q, p)
        if protocol in ("dense", "multiscale") or both:
            out.append(Row(DENSE, x, (0.5 if both else 1.0) / len(scales)))
        if protocol == "multicrop" or both:
            crops = crop_windows(x, crop)  # views: 150 copied crops would be 90 MB an image
            w = (0.5 if both else 1.0) / (len(scales) * len(crops))
            out.extend(Row(CROP, c, w) for c in crops)
    return out


# -- the network side -------------------------------------------------------------------------------
def dense_stride(module: VGG) -> int:
    """Total downsampling of the features (2 ** number of 2x2 pools): 32 for every VGG."""
    return 2 ** sum(layer.kind == "pool" for layer in module.layers())


def padded_shape(shape: Sequence[int], stride: int = 32) -> tuple[int, ...]:
    """(H, W, C) with H and W rounded up to a multiple of ``stride``: the dense bucket."""
    h, w = shape[:2]
    return (-(-h // stride) * stride, -(-w // stride) * stride, *shape[2:])


def _valid_mask(a: jax.Array, valid: jax.Array, h_pad: int) -> jax.Array:
    """``a`` (B, h, w, C) times the valid region of its level: floor(valid / 2 ** level), as the
    pools floor; ``h_pad`` is the padded input height."""
    level = (h_pad // a.shape[1]).bit_length() - 1
    vh, vw = valid[:, 0] >> level, valid[:, 1] >> level
    m = ((jnp.arange(a.shape[1])[None, :, None] < vh[:, None, None])
         & (jnp.arange(a.shape[2])[None, None, :] < vw[:, None, None]))
    return a * m[..., None].astype(a.dtype)


class MaskedDenseVGG(VGG):
    """The dense network (fc6-fc8 as convolutions) on images zero-padded at the bottom/right,
    with each image's true (H, W) in ``valid`` (B, 2). Returns the class score map.

    Zero padding would change a plain forward pass (a padded pixel's conv output is ReLU(bias),
    which then leaks into the image). Here the input of every convolution and of fc6 (the layer
    that reads the map) is multiplied by the valid region of its level, so each convolution sees
    exactly the zeros its own padding would add; max pools of non-negative (post-ReLU) maps
    inside the valid region are unchanged. Same layers and parameter names as ``VGG``, so the
    same variables; the convolution implementation is the ``conv`` field, as for ``VGG``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        h_pad = x.shape[1]
        plan = self.layers()
        x = x.astype(self.dtype)
        fused = False
        for i, layer in enumerate(plan):
            if fused:  # this ReLU ran inside the convolution before it
                fused = False
                continue
            if layer.kind == "conv" or layer.reads_map:
                x = _valid_mask(x, valid, h_pad)
            fused = layer.kind == "conv" and i + 1 < len(plan) and plan[i + 1].kind == "relu"
            x = self.apply_layer(layer, x, train=False, relu=fused)
        return x


def masked_dense_module(module: VGG) -> MaskedDenseVGG:
    """``module``'s fields (its ``conv`` choice included) on ``MaskedDenseVGG``, dense."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(VGG)
              if f.name not in ("parent", "name")}
    return MaskedDenseVGG(**{**fields, "dense": True, "taps": ()})


def _masked_dense(module: VGG, variables: Any, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Dense logits (B, K) of images padded at the bottom/right to a multiple of the stride, each
    equal to the logits of the unpadded image ``x[b, :valid[b, 0], :valid[b, 1]]``: the masked
    score map (``MaskedDenseVGG``) averaged over its valid positions only. Exactness is tested
    against unpadded runs."""
    h_pad = x.shape[1]
    ph, pw = module.pool_size
    score = masked_dense_module(module).apply(variables, x, valid)
    level5 = (h_pad // (score.shape[1] + ph - 1)).bit_length() - 1
    sh, sw = (valid[:, 0] >> level5) - ph + 1, (valid[:, 1] >> level5) - pw + 1
    m = ((jnp.arange(score.shape[1])[None, :, None] < sh[:, None, None])
         & (jnp.arange(score.shape[2])[None, None, :] < sw[:, None, None]))
    total = jnp.sum(score.astype(jnp.float32) * m[..., None], axis=(1, 2))
    return total / (sh * sw)[:, None].astype(jnp.float32)


def flip_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mirror each image's valid region left-right, keeping it at the top-left of the padding."""
    j = valid[:, 1:2] - 1 - jnp.arange(x.shape[2])[None, :]            # (B, W) source column
    out = jnp.take_along_axis(x, jnp.clip(j, 0)[:, None, :, None], axis=2)
    return out * (j >= 0)[:, None, :, None].astype(x.dtype)


def posterior_fns(module: VGG, flip: bool = True) -> dict[str, Callable[..., jax.Array]]:
    """``{CROP: f(variables, x), DENSE: g(variables, x, valid)}``, each -> (B, num_classes)
    softmax posteriors. ``f`` is the standard network on crops. ``g`` runs the same variables
    fully convolutionally on images zero-padded at the bottom/right to a multiple of the stride,
    ``valid`` (B, 2) holding each image's true (H, W); with ``flip`` it averages the posteriors
    of each image and its mirror image (section 3.2)."""
    if module.head != "fc" or not module.include_top:
        raise ValueError("evaluation needs a classifier (head='fc', include_top=True); "
                         f"got head={module.head!r}, include_top={module.include_top}")
    standard = module.clone(dense=False, taps=())

    def crop_fn(variables, x):
        return jax.nn.softmax(standard.apply(variables, x).astype(jnp.float32), axis=-1)

    def dense_fn(variables, x, valid):
        if not flip:
            return jax.nn.softmax(_masked_dense(module, variables, x, valid), axis=-1)
        # One pass over [x0, x0 flipped, x1, x1 flipped, ...]: half the graph to compile, and
        # interleaving keeps each image's mirror on the device that holds the image.
        b = x.shape[0]
        xx = jnp.stack([x, flip_valid(x, valid)], axis=1).reshape(2 * b, *x.shape[1:])
        vv = jnp.repeat(valid, 2, axis=0)
        p = jax.nn.softmax(_masked_dense(module, variables, xx, vv), axis=-1)
        return p.reshape(b, 2, -1).mean(axis=1)

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
    batch is filled with copies of its last row (their results are dropped). Dense images are
    bucketed by their size rounded up to a multiple of 32 and zero-padded; masking keeps the
    result exactly that of the unpadded image (``_masked_dense``), so a dataset of many aspect
    ratios compiles a few dozen shapes, not one per image size. At most ``max_pending`` rows wait
    in partly filled batches before the fullest is run anyway, which bounds memory.
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
        fns = posterior_fns(module, flip)
        self._fns = {
            CROP: jax.jit(fns[CROP], in_shardings=(replicated, self.data),
                          out_shardings=self.data),
            DENSE: jax.jit(fns[DENSE], in_shardings=(replicated, self.data, self.data),
                           out_shardings=self.data)}
        self.stride = dense_stride(module)
        self.calls = 0  # network calls made (for reports and tests)
        self.compile_seconds = 0.0  # spent compiling, once per distinct (kind, input shape)
        self._compiled: dict[tuple, Any] = {}

    def _run(self, key: tuple, arrays: list[np.ndarray]) -> np.ndarray:
        kind, shape = key
        n = len(arrays)
        batch = np.zeros((self.batch_size, *shape), np.float32)
        for i, a in enumerate(arrays):
            batch[i, :a.shape[0], :a.shape[1]] = a  # dense: zero-padded bottom/right
        batch[n:] = batch[n - 1]  # fill a partial batch with copies; their results are dropped
        args = [batch]
        if kind == DENSE:
            valid = np.array([a.shape[:2] for a in arrays], np.int32)
            args.append(np.concatenate([valid, np.repeat(valid[-1:], self.batch_size - n, 0)]))
        self.calls += 1
        args = [jax.device_put(a, self.data) for a in args]
        if key not in self._compiled:  # compile ahead of time, so compiling is timed apart
            t = time.perf_counter()
            self._compiled[key] = self._fns[kind].lower(self.variables, *args).compile()
            self.compile_seconds += time.perf_counter() - t
        return np.asarray(self._compiled[key](self.variables, *args))[:n]

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
            post = self._run(key, [r.array for _, r in bucket])
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
                key = row.key(self.stride)
                buckets[key].append((image_id, row))
                pending += 1
                if len(buckets[key]) == self.batch_size:
                    yield from flush(key)
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


# -- a whole dataset ----------------------------------------------------------------------------------
def host_share(n: int, process_index: int, process_count: int) -> range:
    """The example indices process ``process_index`` of ``process_count`` reads (strided, so
    shares differ by at most one example and every example is read exactly once)."""
    return range(process_index, n, process_count)


def evaluate_source(source: Any, module: VGG, variables: Any, protocol: str,
                    name: str | Mapping[str, Any], *, scales: Sequence[int] | None = None,
                    crop_size: int | None = None, resize_size: int | None = None,
                    flip: bool = True, batch_size: int = 32, limit: int | None = None,
                    image_key: str = "image", label_key: str = "label", threads: int = 8,
                    process_index: int | None = None, process_count: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Top-1/top-5 error of ``protocol`` over a random-access ``source`` of dicts with
    ``image`` (uint8 HWC) and ``label`` (int), e.g. ``tfds.data_source(...)``.

    Each process reads only its share of the first ``limit`` examples (``host_share``), prepares
    rows in ``threads`` threads (PIL releases the GIL while resizing), and runs them on its own
    devices; the counts are summed over processes. Returns images, top1/top5 errors (%), and
    this process's timing: seconds (wall), compile_seconds (once per distinct input shape), and
    images/s excluding compilation.
    """
    import time

    import grain
    from tqdm import tqdm

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    n = len(source) if limit is None else min(limit, len(source))
    share = host_share(n, pi, pc)
    num_classes = module.num_classes

    def prepare(i: int):
        ex = source[i]
        label = int(ex[label_key])
        if not 0 <= label < num_classes:
            raise ValueError(f"example {i} has label {label} but the model has {num_classes} "
                             "classes; evaluate with weights trained on this dataset")
        return label, rows(np.asarray(ex[image_key]), protocol, name, scales, crop_size,
                           resize_size)

    ds = grain.MapDataset.range(len(share)).map(lambda j: prepare(share[j]))
    # small prefetch: a multi-crop image holds three rescaled copies until it is scored
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    labels: dict[int, int] = {}

    def items():
        for j, (label, image_rows) in enumerate(it):
            labels[j] = label
            yield j, image_rows

    ev = Evaluator(module, variables, flip=flip, batch_size=batch_size)
    counts = {"images": 0, "top1": 0, "top5": 0}
    bar = tqdm(total=len(share), unit="img", desc=protocol, disable=not progress or pi != 0)
    start = time.perf_counter()
    for j, post in ev(items()):
        c = topk_correct(post[None], np.array([labels.pop(j)]), (1, 5))
        counts["images"] += 1
        counts["top1"] += c[1]
        counts["top5"] += c[5]
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    local = counts["images"]
    counts = allreduce_counts(counts)
    total = max(counts["images"], 1)
    return {"images": counts["images"], "top1_error": 100.0 * (1 - counts["top1"] / total),
            "top5_error": 100.0 * (1 - counts["top5"] / total), "seconds": seconds,
            "local_images": local, "images_per_s": local / max(seconds - ev.compile_seconds, 1e-9),
            "compile_seconds": ev.compile_seconds, "distinct_shapes": len(ev._compiled),
            "network_calls": ev.calls, "batch_size": ev.batch_size, "devices": ev.mesh.size}


# -- scoring ----------------------------------------------------------------------------------------
def topk_hits(scores, labels, k: int, xp=np):
    """Whether each of ``labels`` (N,) is among the k highest ``scores`` (N, K): the one top-k rule
    of evaluation and of the trainer's metrics (``xp=jax.numpy`` under jit)."""
    # rank of the true class in a stable descending sort: classes scored higher, plus tied
    # classes with a lower index (so ties, e.g. posteriors that underflowed to 0, never help)
    true = xp.take_along_axis(scores, labels[:, None], axis=1)
    lower = xp.arange(scores.shape[1])[None, :] < labels[:, None]
    return ((scores > true) | ((scores == true) & lower)).sum(axis=1) < k


def topk_correct(posteriors: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
                 ) -> dict[int, int]:
    """How many of ``labels`` (N,) are among the k highest ``posteriors`` (N, K), for each k."""
    posteriors, labels = np.asarray(posteriors), np.asarray(labels)
    return {k: int(topk_hits(posteriors, labels, k).sum()) for k in ks}


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
