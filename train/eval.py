"""Evaluate a vgg_flax checkpoint with one of the paper's test protocols.

    python train/eval.py --weights ckpt/vgg16 --dataset imagenet2012 --protocol multiscale
    python train/eval.py --weights runs/mine_export --dataset folder --data-dir photos  # ROOT/val

prints top-1 / top-5 error in the form of the paper's Tables 3-5. Protocols (see
``vgg_flax.evaluate``): single (torchvision's center crop), dense, multiscale, multicrop,
dense+multicrop. Test scales come from the training scale S (``--train-scale 256`` or jittered
``--train-scale 256,512``) as in the paper, or explicitly with ``--scales``.
Runs on every local device (batch sharded over a 'data' mesh axis); with several processes each
reads only its share and the counts are summed. ``--synthetic HxW`` times a protocol on random
images instead of a dataset (throughput only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, not train/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np

from vgg_flax import evaluate as E
from vgg_flax.published import weights_argument
from vgg_flax.images import preprocessing


def parse_args(argv=None) -> argparse.Namespace:
    from vgg_flax.cli import ArgumentParser, positive_int, positive_ints as _ints
    p = ArgumentParser(prog="train/eval.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint directory written by "
                   "vgg_flax.save, or a model name (vgg16 ...) for its published weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="TFDS name, e.g. imagenet2012 (prepared in --data-dir), "
                     "or 'folder': your images in --data-dir/<split>/<class>/<image>")
    src.add_argument("--synthetic", metavar="HxW", help="random HxW images, to time a protocol")
    p.add_argument("--split", default=None, help="default: 'validation' (TFDS), 'val' (folder)")
    p.add_argument("--train-split", default="train",
                   help="folder: the split whose class folders define the class indices")
    p.add_argument("--data-dir", default=None, help="TFDS data directory, or the folder ROOT")
    p.add_argument("--protocol", default="single", choices=E.PROTOCOLS)
    p.add_argument("--train-scale", type=_ints, default=None,
                   help="training scale S, or S_min,S_max if scale-jittered (default: the "
                        "weights' resize size, 256 for torchvision's)")
    p.add_argument("--scales", type=_ints, default=None, help="test scales Q (overrides the paper's)")
    p.add_argument("--crop-size", type=positive_int, default=None, help="network input for single/multicrop")
    p.add_argument("--resize-size", type=positive_int, default=None, help="single: shorter side before crop")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="dense: do not average with the mirror image")
    p.add_argument("--batch-size", type=positive_int, default=32, help="network inputs per call, per process")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")
    p.add_argument("--threads", type=positive_int, default=8, help="threads preparing images")
    p.add_argument("--image-key", default="image")
    p.add_argument("--label-key", default="label")
    return p.parse_args(argv)


def open_dataset(name: str, split: str, data_dir: str | None, train_split: str = "train"):
    """The random-access source the trainer reads (``train.input_pipeline``), never downloading.
    A folder's undecodable file ends the evaluation with its path (no silent substitute)."""
    import ml_collections

    from train import folder, input_pipeline
    config = ml_collections.ConfigDict(dict(
        dataset=name, data_dir=data_dir, manual_dir=None, download=False,
        train_split=train_split, input=dict(draft=False)))
    try:
        if name == "folder":
            return _Strict(folder.sources(config, split, substitute=False))
        return input_pipeline.get_source(config, split)
    except input_pipeline.DataError as e:
        if name == "folder":
            raise SystemExit(f"error: {e}") from None
        first = str(e).split("; ")[0]
        raise SystemExit(
            f"error: cannot open TFDS dataset {name!r} split {split!r} ({first}); this machine "
            f"cannot download it: prepare it where there is network (`tfds build {name}`, "
            "ImageNet needs its manual download in ~/tensorflow_datasets/downloads/manual) "
            "and pass --data-dir") from None


class _Strict:
    """A folder source whose undecodable files raise (evaluation must not count a stand-in)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        ex = self.source[i]
        if not ex["ok"]:
            path = self.source.samples[i][0]
            raise ValueError(f"{path}: cannot decode image ({self.source.skipped.paths[path]}); "
                             "remove or replace the file")
        return ex


class SyntheticSource:
    """``n`` random uint8 images of one size with label 0 (timing only)."""

    def __init__(self, hw: str, n: int):
        try:
            self.h, self.w = (int(t) for t in hw.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --synthetic wants HxW, e.g. 375x500, got {hw!r}") from None
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return {"image": rng.integers(0, 256, (self.h, self.w, 3), dtype=np.uint8), "label": 0}


def test_scales_for(args, name: str) -> tuple[tuple[int, ...] | None, str]:
    """(test scales, training-scale label) for the protocol, as the paper picks them."""
    if args.protocol == "single":
        return None, "-"
    s = args.train_scale or (preprocessing(name)["resize_size"],)
    if len(s) not in (1, 2):
        raise SystemExit("error: --train-scale takes S or S_min,S_max")
    train = s[0] if len(s) == 1 else s
    if args.scales:
        scales = args.scales
    elif args.protocol == "dense":
        scales = (E.single_scale(train),)
    else:
        scales = E.test_scales(train)
    return scales, (str(s[0]) if len(s) == 1 else f"[{s[0]};{s[1]}]")


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        info, module, variables = weights_argument(args.weights)
    except (OSError, ValueError) as e:  # incl. WeightsUnavailableError, WeightMismatchError
        raise SystemExit(f"error: {e}") from None
    name = info["name"]
    scales, train_label = test_scales_for(args, name)
    if args.synthetic:
        source = SyntheticSource(args.synthetic, args.limit or 64)
    else:
        args.split = args.split or ("val" if args.dataset == "folder" else "validation")
        source = open_dataset(args.dataset, args.split, args.data_dir, args.train_split)
    try:
        result = E.evaluate_source(
            source, module, variables, args.protocol, name, scales=scales,
            crop_size=args.crop_size, resize_size=args.resize_size, flip=args.flip,
            batch_size=args.batch_size, limit=args.limit, image_key=args.image_key,
            label_key=args.label_key, threads=args.threads)
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    p = preprocessing(name)
    if args.protocol == "single":
        test_label = f"{args.resize_size or p['resize_size']}/{args.crop_size or p['crop_size']} crop"
    else:
        test_label = ",".join(map(str, scales))
    model = name + ("" if not info.get("overrides") else
                    " (" + ", ".join(f"{k}={v}" for k, v in info["overrides"].items()
                                     if k not in ("cfg",)) + ")")
    table = E.error_table([dict(model=model, protocol=args.protocol + ("" if args.flip else ", no flip"),
                                train_scale=train_label, test_scales=test_label, **result)])
    where = args.synthetic and f"synthetic {args.synthetic} (errors meaningless)" or \
        f"{args.dataset}:{args.split}"
    print(f"{where}: {result['images']} images; process 0: {result['seconds']:.1f} s, "
          f"of which {result['compile_seconds']:.1f} s compiling {result['distinct_shapes']} "
          f"input shape(s); {result['images_per_s']:.3g} images/s excluding compilation on "
          f"{result['devices']} device(s), batch {result['batch_size']}, "
          f"{result['network_calls']} network calls")
    print(table)
    return result


def cli(argv=None) -> int:
    """The command line: ``main``'s one-line errors (SystemExit with the message) exit 2."""
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
