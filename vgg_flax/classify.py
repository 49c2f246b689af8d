"""Top-5 classes of image files (ImageNet's, or a fine-tuned checkpoint's own): ``python -m vgg_flax.classify IMAGE... --weights DIR``.

Images are read with PIL (EXIF orientation applied), preprocessed exactly as the weights'
torchvision transforms (``vgg_flax.preprocess``) and classified in batches; no torch needed.
A file that cannot be read gets one ``error:`` line on stderr and the others are still
classified; the exit status is 1 if any file failed. ``--protocol`` runs one of the paper's test
protocols instead of torchvision's single center crop (see ``vgg_flax.evaluate``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from vgg_flax import evaluate as E
from vgg_flax.images import load_image, preprocessing


def top_classes(posterior: np.ndarray, k: int = 5, categories: Sequence[str] | None = None
                ) -> list[tuple[int, str, float]]:
    """The ``k`` most probable (class index, name, probability), most probable first."""
    order = np.argsort(-posterior, kind="stable")[:k]
    names = categories if categories is not None and len(categories) == len(posterior) else None
    return [(int(i), names[i] if names else f"class {i}", float(posterior[i])) for i in order]


def classify(images: Sequence[Any], module, variables, name: str | Mapping[str, Any], *,
             protocol: str = "single", scales: Sequence[int] | None = None, top: int = 5,
             batch_size: int = 8, categories: Sequence[str] | None = None
             ) -> list[list[tuple[int, str, float]]]:
    """Top-``top`` classes of each image (PIL or uint8 HWC), in input order."""
    if protocol != "single" and not scales:  # the paper's choice for S = the weights' resize size
        s = preprocessing(name)["resize_size"]
        scales = (E.single_scale(s),) if protocol == "dense" else E.test_scales(s)
    # one device: a handful of images gains nothing from sharding
    ev = E.Evaluator(module, variables, batch_size=batch_size,
                     mesh=Mesh(np.array(jax.local_devices()[:1]), ("data",)))
    posts = dict(ev((i, E.rows(im, protocol, name, scales)) for i, im in enumerate(images)))
    return [top_classes(posts[i], top, categories) for i in range(len(images))]


# PIL modes of more than 8 bits whose range is unknown: 32-bit integers and floats (16-bit images
# are scaled, images.to_8bit). RGB conversion (torchvision's too) clips them to 0..255.
_DEEP_MODES = ("I", "F")


def deep_image_warning(path: str | os.PathLike) -> str | None:
    """One warning line if ``path`` is a 32-bit image that RGB conversion will clip."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode = im.mode
    except (OSError, ValueError):
        return None  # load_image reports unreadable files
    if mode not in _DEEP_MODES:
        return None
    return (f"warning: {path}: 32-bit ({mode}) image is read as 0..255 and clipped, as "
            "torchvision does; rescale it to 8 bits first")


def main(argv: Sequence[str] | None = None) -> int:
    from vgg_flax import cli
    p = cli.ArgumentParser(prog="python -m vgg_flax.classify",
                           description="Top-5 ImageNet classes of image files.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, help="checkpoint directory written by "
                   "vgg_flax.save, or a model name (vgg16 ...) for its published weights "
                   "(vgg_flax.pretrained: cached, or from the Hugging Face hub)")
    p.add_argument("--top", type=cli.positive_int, default=5)
    p.add_argument("--protocol", default="single", choices=E.PROTOCOLS)
    p.add_argument("--scales", type=cli.positive_ints, default=None,
                   help="test scales Q, comma-separated (default: the paper's around 256)")
    args = p.parse_args(argv)
    scales = args.scales

    # Read everything first so a bad file costs no model load, and the good ones still run.
    loaded, failed = [], 0
    for path in args.images:
        try:
            warning = deep_image_warning(path)
            if warning:
                print(warning, file=sys.stderr)
            loaded.append((path, load_image(path)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if loaded:
        from vgg_flax import registry
        from vgg_flax.published import weights_argument
        try:
            info, module, variables = weights_argument(args.weights)
        except (OSError, ValueError) as e:  # incl. WeightsUnavailableError, WeightMismatchError
            print(f"error: {e}", file=sys.stderr)
            return 2
        name = info["name"]
        # a fine-tuned checkpoint carries its class names (train/export.py of a folder run)
        categories = info.get("categories") or (
            registry.imagenet_categories() if module.num_classes == 1000 else None)
        try:
            results = classify([im for _, im in loaded], module, variables, name,
                               protocol=args.protocol, scales=scales, top=args.top,
                               categories=categories)
        except ValueError as e:  # arguments the weights cannot serve (a scale below the crop...)
            print(f"error: {e}", file=sys.stderr)
            return 2
        for (path, _), best in zip(loaded, results):
            print(os.fspath(path))
            for rank, (index, label, prob) in enumerate(best, 1):
                print(f"  {rank}. {100 * prob:6.2f}%  {label} ({index})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
