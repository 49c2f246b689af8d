"""The two command lines (``convert/*.py`` and the ``vgg-torch-to-flax``/``vgg-flax-to-torch``
console scripts): parse arguments, call ``jobs``, print the summary. Exit 0 on success, 1 when
verification fails (nothing written), 2 for bad arguments or files (one line), 130 on Ctrl-C."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Sequence

from vgg_flax import registry
from vgg_flax.convert import atomic
from vgg_flax.errors import ConversionError
from vgg_flax.convert.formats import FORMATS
from vgg_flax.convert.jobs import Summary, flax_to_torch, torch_to_flax
from vgg_flax.convert.mapping import DTYPES
from vgg_flax.convert.sources import check_num_classes
from vgg_flax.fields import FIELDS, field_problem


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(2, f"error: {message} (see --help)\n")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# Fields that change what ``apply`` returns, not the weights: chosen when loading.
_RUN_TIME_FIELDS = ("taps", "dense")


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as VGG fields, each checked against the VGG's own rules
    (``fields.FIELDS``, as ``create`` checks them): one line naming the item otherwise."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConversionError(f"--set {item!r}: write FIELD=VALUE, e.g. --set hidden_size=1024")
        k, v = (t.strip() for t in item.split("=", 1))
        if k not in FIELDS:
            raise ConversionError(f"--set {item}: unknown VGG field {k!r}; fields are "
                                  f"{', '.join(f for f in FIELDS if f not in _RUN_TIME_FIELDS)}")
        if k in _RUN_TIME_FIELDS:
            raise ConversionError(f"--set {item}: {k} is not a property of the weights; choose "
                                  f"it when loading them: vgg_flax.load(path, {k}=...)")
        value = _parse_value(v)
        problem = field_problem(k, value)
        if problem is not None:
            pair = "; write a pair as --set pool_size=7,7" if k == "pool_size" else ""
            raise ConversionError(f"--set {item}: {problem}{pair}")
        out[k] = value
    return out


def _run(job: Callable[[], Summary], argv: Sequence[str] | None = ()) -> int:
    if argv is None:  # the process's own command line: Ctrl-C ends it at once, cleanly, and
        with atomic.ExitOnInterrupt():  # so does the end (teardown took seconds, XLA's
            code = _run(job)            # threads running)
        atomic.exit_now(code)
    try:
        summary = job()
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    if summary.verification is not None and not summary.verification.ok:
        why = ("outputs differ beyond the tolerance" if math.isfinite(summary.verification.max_rel)
               else "the outputs are not finite (NaN or inf)")
        print(f"error: {why}; {summary.out} was not written (--no-verify writes it unchecked)",
              file=sys.stderr)
        return 1
    return 0


def torch_to_flax_main(argv: Sequence[str] | None = None) -> int:
    """``vgg-torch-to-flax`` / ``python convert/torch_to_flax.py``."""
    p = _Parser(prog="torch_to_flax.py", description=(
        "Convert torchvision (or SSD, or your own) VGG weights to Flax and check the result "
        "against torchvision's model. Names: " + ", ".join(registry.list_models())))
    p.add_argument("name", help="VGG name, e.g. vgg16, vgg19_bn, vgg16_ssd")
    p.add_argument("--weights", help="torchvision weights (IMAGENET1K_V1, IMAGENET1K_FEATURES, "
                   "DEFAULT; default: IMAGENET1K_V1, for vgg16_ssd IMAGENET1K_FEATURES) or a "
                   ".pth/.pt/.safetensors file (state_dict or checkpoint with one under "
                   "'state_dict'/'model'; DataParallel 'module.' prefixes are fine; timm's "
                   "layout too), or hf:OWNER/REPO[/FILE] from the Hugging Face hub, e.g. "
                   "hf:timm/vgg16.tv_in1k")
    p.add_argument("--out", help="output path (default out/NAME, plus .safetensors/.msgpack)")
    p.add_argument("--format", choices=FORMATS, help="orbax (default; read by vgg_flax.load), "
                   "safetensors or msgpack (flax.serialization); default from --out's suffix")
    p.add_argument("--no-verify", action="store_true", help="skip the torchvision comparison")
    p.add_argument("--image", nargs="+", default=[], metavar="FILE",
                   help="also verify on these images (preprocessed as the weights expect)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--num-classes", type=int, help="classes of the weights' head (e.g. 10 for a "
                   "fine-tuned head)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="other VGG fields the weights were built with, e.g. hidden_size=1024, "
                        "pool_size=1,1, width=0.5 (as vgg_flax.create)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype written "
                   "(default float32: fp16/bf16 weights are widened exactly; keep: as stored)")
    p.add_argument("--ssd-from-classifier", action="store_true", help="vgg16_ssd from vgg16 "
                   "classifier weights: conv6/conv7 decimated from fc6/fc7 (SSD's reduced fc)")
    p.add_argument("--ssd-features-only", action="store_true", help="vgg16_ssd from weights "
                   "without conv6/conv7: initialise them as torchvision's ssd300_vgg16 does")
    p.add_argument("--seed", type=int, default=0, help="seed for --ssd-features-only's init")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="verification tolerance on max |diff| / max |torch output|")
    p.add_argument("--verify-batch", type=int, default=4, metavar="N",
                   help="seeded random inputs to verify on (besides --image)")
    args = p.parse_args(argv)

    def job() -> Summary:
        return torch_to_flax(args.name, args.weights, args.out, fmt=args.format,
                             verify_outputs=not args.no_verify, images=args.image,
                             force=args.force, rtol=args.rtol, num_classes=args.num_classes,
                             overrides=_parse_sets(args.set), dtype=args.dtype,
                             ssd_from_classifier=args.ssd_from_classifier,
                             ssd_features_only=args.ssd_features_only, seed=args.seed,
                             verify_batch=args.verify_batch)
    return _run(job, argv)


def flax_to_torch_main(argv: Sequence[str] | None = None) -> int:
    """``vgg-flax-to-torch`` / ``python convert/flax_to_torch.py``."""
    p = _Parser(prog="flax_to_torch.py", description=(
        "Convert a vgg_flax checkpoint back to a torch state_dict that torchvision's model loads "
        "with strict=True, and check it against the Flax model."))
    p.add_argument("src", help="checkpoint directory (vgg_flax.save / torch_to_flax.py), or a "
                   ".safetensors written by torch_to_flax.py, or a flax .msgpack with --name")
    p.add_argument("--out", required=True, help="output file: .pth/.pt or .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip the torchvision comparison")
    p.add_argument("--image", nargs="+", default=[], metavar="FILE")
    p.add_argument("--name", help="VGG name (only for .msgpack input, which does not record it)")
    p.add_argument("--num-classes", type=int, help="with --name: classes of the head")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --name: other VGG fields")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--verify-batch", type=int, default=4, metavar="N")
    args = p.parse_args(argv)

    def job() -> Summary:
        overrides = _parse_sets(args.set)
        if args.num_classes is not None:
            check_num_classes(args.num_classes)
            overrides["num_classes"] = args.num_classes
        return flax_to_torch(args.src, args.out, force=args.force,
                             verify_outputs=not args.no_verify, name=args.name,
                             overrides=overrides, rtol=args.rtol, images=args.image,
                             verify_batch=args.verify_batch)
    return _run(job, argv)
