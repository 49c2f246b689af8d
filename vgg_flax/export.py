"""A VGG as a file another process runs: ``python -m vgg_flax.export WEIGHTS --out PATH``.

Two formats, both taking float32 NHWC images (the batch ``vgg_flax.preprocess`` makes) and
giving what ``module.apply(variables, images)`` gives, weights inside:

- ``stablehlo``: ``jax.export`` of the module, for every platform JAX serializes for; run it
  with ``jax.export.deserialize(data).call(images)``. Convolutions lower to XLA's (oneDNN's
  custom calls exist only in this process), so any JAX on any CPU, GPU or TPU runs it.
- ``onnx``: the same layer walk (``arch``) written in torch over ``vgg_flax.to_torch``'s
  weights and exported by torch's ``torch.export``-based ONNX exporter; run it with
  onnxruntime. float32 only (onnxruntime's CPU kernels have no bfloat16 convolution).

The batch dimension is symbolic unless ``batch`` fixes it; height and width are fixed. The
artifact is written under a hidden temporary name, run there on a seeded batch against the
Flax model, and renamed only if it agrees (``rtol`` on max |diff| / max |Flax output|, per
output); else it is deleted and nothing appears at ``out``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import arch, checkpoint, cli, registry, weights
from vgg_flax.convert import atomic
from vgg_flax.errors import ConversionError
from vgg_flax.convert.memory import mb, peak_rss_bytes
from vgg_flax.model import VGG
from vgg_flax.published import weights_argument

FORMATS = {"stablehlo": ".stablehlo", "onnx": ".onnx"}   # format -> file suffix
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
# Default tolerance by compute dtype: float32 as the converter's; a 16-bit model's artifact
# rounds its convolutions at other places than oneDNN in this process does.
RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
MAX_BATCH, MAX_SIZE = 1024, 4096
VERIFY_BATCH = 2  # a symbolic batch is checked at 2: a batch of 1 would hide a broadcast
_ONNX_NEEDS = ("torch", "onnxscript", "onnx", "onnxruntime")


class ExportError(ValueError):
    """Bad arguments for an export (exit 2); the message is one line naming the fix."""


@dataclasses.dataclass
class Verification:
    runner: str                  # what ran the artifact
    inputs: int
    hw: tuple[int, int]
    outputs: tuple[str, ...]
    max_abs: float
    max_rel: float               # max over outputs of max |diff| / max |Flax output|
    rtol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.rtol

    def line(self) -> str:
        return (f"verify: {self.runner} against Flax on {self.inputs} seeded inputs "
                f"{self.hw[0]}x{self.hw[1]}, {'/'.join(self.outputs)} max |diff| "
                f"{self.max_abs:.2e}, max rel {self.max_rel:.2e} (tolerance {self.rtol:g}): "
                f"{'OK' if self.ok else 'FAILED'}")


@dataclasses.dataclass
class Summary:
    label: str
    num_params: int
    out: Path
    fmt: str
    input_shape: tuple[Any, ...]  # (None for a symbolic batch, H, W, C)
    dtype: str
    out_bytes: int
    seconds: float
    peak_rss: int
    verification: Verification

    def lines(self) -> list[str]:
        if not self.verification.ok:  # nothing was written: no line claims otherwise
            return [self.verification.line()]
        n = "batch" if self.input_shape[0] is None else self.input_shape[0]
        shape = "x".join(str(d) for d in (n, *self.input_shape[1:]))
        return [self.verification.line(),
                f"{self.label}: {self.num_params:,} parameters ({self.dtype}) -> {self.out} "
                f"({self.fmt}, input {shape} float32 NHWC, {mb(self.out_bytes)}) in "
                f"{self.seconds:.1f} s, peak RSS {mb(self.peak_rss)}"]


# ---- the layer walk's outputs ------------------------------------------------------------------

def output_names(module: VGG) -> tuple[str, ...]:
    """Names of the artifact's outputs, in order: the taps, or ``logits``, or the last layer."""
    if module.taps:
        return tuple(module.taps)
    if module.include_top and module.head == "fc":
        return ("logits",)
    return (module.layers()[-1].name,)


def _stop(module: VGG, plan: Sequence[arch.Layer]) -> int:
    """Index in ``plan`` of the deepest layer to compute (``VGG._stop`` outside a Flax scope)."""
    if not module.taps:
        return len(plan) - 1
    unknown = [t for t in module.taps if t not in module.tap_names()]
    if unknown:
        raise ExportError(f"unknown tap(s) {unknown}; this VGG has: "
                          f"{', '.join(module.tap_names())}")
    index = {layer.name: i for i, layer in enumerate(plan)}
    index[arch.L2NORM_NAME] = index.get(arch.L2NORM_AFTER, 0)
    return max(index[t] for t in module.taps)


def _named(outputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``module.apply``'s result (a dict of taps, or one array) as name -> float32 array."""
    if not isinstance(outputs, dict):
        outputs = dict(zip(names, [outputs], strict=True))
    return {n: np.asarray(outputs[n], np.float32) for n in names}


# ---- StableHLO --------------------------------------------------------------------------------

def to_stablehlo(module: VGG, variables: Any, input_shape: Sequence[Any],
                 platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
    """``jax.export`` of ``images -> module.apply(variables, images)`` with the variables as
    constants. ``input_shape`` is (N, H, W, C), N None for a symbolic batch named "batch"."""
    n, h, w, c = input_shape
    batch = jax.export.symbolic_shape("batch")[0] if n is None else n
    spec = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32)
    forward = jax.jit(lambda images: module.apply(variables, images))
    return jax.export.export(forward, platforms=tuple(platforms))(spec)


# ---- ONNX: the layer walk in torch, through torch.export --------------------------------------

def _torch_module(module: VGG, variables: Any):
    """A torch ``nn.Module`` computing ``module.apply(variables, images)`` (inference) on NHWC
    float32 images, returning a tuple in ``output_names(module)`` order."""
    import torch
    import torch.nn.functional as F

    plan = module.layers()
    stop, want = _stop(module, plan), set(module.taps)
    dense = module.dense and module.include_top and module.head == "fc"
    sd = weights.to_torch(variables, module, as_numpy=True)  # may be views of jax's arrays
    tensors = {e.path: torch.from_numpy(np.array(sd.pop(e.torch_key), np.float32))
               for e in weights.torch_entries(module)}
    for layer in plan:  # fully connected layers on a map are convolutions (dense evaluation)
        if layer.kind == "fc" and dense:
            w = tensors[layer.name, "kernel"]
            tensors[layer.name, "kernel"] = (w.reshape(w.shape[0], -1, *module.pool_size)
                                             if layer.reads_map else w[:, :, None, None])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for (layer, leaf), t in tensors.items():
                self.register_buffer(f"{layer}__{leaf}", t.contiguous())

        def p(self, layer: str, leaf: str):
            return getattr(self, f"{layer}__{leaf}")

        def layer(self, layer: arch.Layer, x):
            kind, name = layer.kind, layer.name
            if kind == "conv":
                return F.conv2d(x, self.p(name, "kernel"), self.p(name, "bias"),
                                padding=layer.padding, dilation=layer.dilation)
            if kind == "bn":
                return F.batch_norm(x, self.p(name, "mean"), self.p(name, "var"),
                                    self.p(name, "scale"), self.p(name, "bias"),
                                    training=False, eps=module.bn_epsilon)
            if kind == "relu":
                return F.relu(x)
            if kind == "lrn":
                return F.local_response_norm(x, module.lrn_size, module.lrn_alpha,
                                             module.lrn_beta, module.lrn_k)
            if kind == "pool":
                if layer.pool == "3x3s1":
                    return F.max_pool2d(x, 3, 1, 1)
                return F.max_pool2d(x, 2, 2, ceil_mode=layer.pool == "ceil")
            if kind == "dropout":
                return x
            if kind == "fc":
                w, b = self.p(name, "kernel"), self.p(name, "bias")
                if dense:
                    return F.conv2d(x, w, b)
                if layer.reads_map:  # torch's (C, H, W) flatten: to_torch's fc6 layout
                    x = F.adaptive_avg_pool2d(x, tuple(module.pool_size)).flatten(1)
                return F.linear(x, w, b)
            raise ValueError(f"unknown layer kind {kind!r}")

        def forward(self, images):
            x = images.permute(0, 3, 1, 2)
            out = {}
            for layer in plan[: stop + 1]:
                x = self.layer(layer, x)
                out[layer.name] = x
                if layer.name == arch.L2NORM_AFTER and module.l2norm and arch.L2NORM_NAME in want:
                    scale = self.p(arch.L2NORM_NAME, "scale")[:, None, None]
                    out[arch.L2NORM_NAME] = F.normalize(x, dim=1, eps=1e-12) * scale
            results = ([out[t] for t in module.taps] if module.taps else
                       [x.mean(dim=(2, 3)) if dense else x])
            return tuple(r.permute(0, 2, 3, 1) if r.ndim == 4 else r for r in results)

    return Net().eval()


def check_onnx(dtype: Any) -> None:
    """ExportError unless an ONNX export of a ``dtype`` model can run here."""
    if jnp.dtype(dtype) != jnp.float32:
        raise ExportError(f"ONNX export is float32 only (onnxruntime has no "
                          f"{jnp.dtype(dtype).name} convolution on CPU); export float32, "
                          "or use --format stablehlo for a 16-bit model")
    missing = [p for p in _ONNX_NEEDS if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: "
                          "pip install 'vgg_flax[export]'")


def to_onnx(module: VGG, variables: Any, input_shape: Sequence[Any]) -> bytes:
    """A serialized ONNX model of ``module.apply(variables, images)``: input ``images``
    (N, H, W, C) float32, N symbolic ("batch") when None; outputs named by ``output_names``."""
    check_onnx(module.dtype)
    import torch
    n, h, w, c = input_shape
    net = _torch_module(module, variables)
    example = torch.zeros((n or VERIFY_BATCH, h, w, c), dtype=torch.float32)
    dynamic = None if n else ({0: torch.export.Dim("batch")},)
    # The exporter reports its steps on stdout and warns about its own internals.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                    output_names=list(output_names(module)),
                                    dynamic_shapes=dynamic, verbose=False)
    return program.model_proto.SerializeToString()


# ---- running and verifying a written artifact -------------------------------------------------

def run(path: str | Path, images: np.ndarray, name: str = "output") -> dict[str, np.ndarray]:
    """The outputs of the artifact at ``path`` on ``images`` as float32, by name: the taps, or
    ONNX's output name; a StableHLO program's single array is called ``name``."""
    path = Path(path)
    if format_for(path, None) == "stablehlo":
        out = jax.export.deserialize(bytearray(path.read_bytes())).call(images)
        out = out if isinstance(out, dict) else {name: out}
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"images": images})
    return {n: np.asarray(o, np.float32) for n, o in zip(names, outputs, strict=True)}


def verify(path: str | Path, module: VGG, variables: Any, images: np.ndarray,
           rtol: float) -> Verification:
    """The artifact at ``path`` (format by its suffix) against ``module.apply(variables,
    images)``."""
    names = output_names(module)
    expected = _named(jax.jit(module.apply)(variables, images), names)
    got = run(path, images, names[0])
    max_abs = max_rel = 0.0
    for n, e in expected.items():
        g = got.get(n)
        if g is None or e.shape != g.shape:
            max_abs = max_rel = float("inf")
            break
        diff = float(np.max(np.abs(e - g))) if e.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale else diff)
    runner = "jax.export" if format_for(Path(path), None) == "stablehlo" else "onnxruntime"
    return Verification(runner, images.shape[0], images.shape[1:3], names, max_abs, max_rel,
                        rtol)


# ---- the whole job ----------------------------------------------------------------------------

def format_for(out: Path, fmt: str | None) -> str:
    """``fmt``, or the format ``out``'s suffix names; ExportError when they disagree."""
    by_suffix = {s: f for f, s in FORMATS.items()}
    named = by_suffix.get(out.suffix)
    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = fmt or named
    if fmt is None:
        raise ExportError(f"--out {out}: name the file {out.stem}.stablehlo or {out.stem}.onnx "
                          "(or pass --format)")
    if named != fmt:
        raise ExportError(f"--out {out} does not end in {FORMATS[fmt]} as a {fmt} file does; "
                          f"use --out {out.with_suffix(FORMATS[fmt])}"
                          + (f" or --format {named}" if named else ""))
    return fmt


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; name a file in it, e.g. "
                          f"{out / 'model'}{out.suffix or '.onnx'}")
    try:
        atomic.check_out(out, force)
    except ConversionError as err:
        raise ExportError(str(err)) from None


def _check_shape(module: VGG, batch: int | None, size: Sequence[int]) -> None:
    if batch is not None and not (isinstance(batch, int) and 1 <= batch <= MAX_BATCH):
        raise ExportError(f"--batch {batch}: use an integer in 1..{MAX_BATCH}, or leave it out "
                          "for a batch of any size")
    lo = module.min_input_size()
    if len(size) != 2 or any(not (lo <= s <= MAX_SIZE) for s in size):
        raise ExportError(f"--size {','.join(map(str, size))}: this VGG takes images of "
                          f"{lo}..{MAX_SIZE} pixels a side; pass --size H or --size H,W in that "
                          "range")


def seeded_images(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A standard normal float32 batch of ``shape`` (N, H, W, C), the same for every run."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def export(module: VGG, variables: Any, out: str | Path, fmt: str | None = None, *,
           batch: int | None = None, size: Sequence[int] | None = None,
           rtol: float | None = None, force: bool = False, label: str = "VGG") -> Summary:
    """Write ``module`` with ``variables`` to ``out`` as ``fmt`` ("stablehlo" or "onnx"; by
    default from ``out``'s suffix), verified against the Flax model.

    ``batch`` fixes the batch size (default: symbolic); ``size`` is (H, W) (default 224x224,
    SSD 300x300). Raises ExportError on bad arguments before any work. When verification fails
    nothing is written and the Summary's ``verification.ok`` is False.
    """
    start = time.perf_counter()
    out = Path(out)
    fmt = format_for(out, fmt)
    _check_out(out, force)
    if size is None:
        size = (300, 300) if module.head == "ssd" else (224, 224)
    size = tuple(size) * (2 if len(size) == 1 else 1)
    _check_shape(module, batch, size)
    _stop(module, module.layers())  # unknown taps, before any work
    in_channels = int(np.shape(variables["params"]["conv1_1"]["kernel"])[2])
    rtol = RTOL[jnp.dtype(module.dtype).name] if rtol is None else rtol
    if not 0 < rtol < 1:
        raise ExportError(f"--rtol {rtol}: use a number between 0 and 1, e.g. 1e-4")
    input_shape = (batch, *size, in_channels)
    if fmt == "onnx":
        data = to_onnx(module, variables, input_shape)
    else:
        data = to_stablehlo(module, variables, input_shape).serialize()
    images = seeded_images((batch or VERIFY_BATCH, *size, in_channels))

    def write_error(err: OSError) -> ExportError:
        return ExportError(f"cannot write {out} ({err.strerror or err}); free space or pick "
                           "another --out")

    with atomic.staged(out, write_error) as tmp:
        with atomic.interrupt_after():
            tmp.write_bytes(data)
        del data
        result = verify(tmp, module, variables, images, rtol)
        atomic.settle(tmp, out, force, result)
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(variables.get("params", {})))
    return Summary(label, num_params, out, fmt, input_shape, jnp.dtype(module.dtype).name,
                   out.stat().st_size if result.ok else 0, time.perf_counter() - start,
                   peak_rss_bytes(), result)


# ---- command line -----------------------------------------------------------------------------

def _batch(text: str) -> int:
    value = cli.positive_int(text)
    if value > MAX_BATCH:
        raise cli.argparse.ArgumentTypeError(f"expected at most {MAX_BATCH}, got {value}")
    return value


def _rtol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise cli.argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise cli.argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def _size(text: str) -> tuple[int, ...]:
    values = cli.positive_ints(text)
    if len(values) > 2:
        raise cli.argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}")
    if max(values) > MAX_SIZE:
        raise cli.argparse.ArgumentTypeError(f"expected at most {MAX_SIZE} pixels, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vgg_flax.export`` / ``vgg-export``: 0 written, 1 verification failed (nothing
    written), 2 bad arguments (one line), 130 Ctrl-C (nothing written)."""
    p = cli.ArgumentParser(prog="python -m vgg_flax.export", description=(
        "Write a VGG as a StableHLO (jax.export) or ONNX file, verified against the Flax model."))
    p.add_argument("weights", metavar="WEIGHTS", help="checkpoint directory written by "
                   "vgg_flax.save, or a model name (vgg16 ...) for its published weights")
    p.add_argument("--out", required=True, type=Path,
                   help="output file: NAME.stablehlo or NAME.onnx")
    p.add_argument("--format", choices=tuple(FORMATS), help="default: from --out's suffix")
    p.add_argument("--batch", type=_batch, help=f"fix the batch size (1..{MAX_BATCH}); "
                   "default: any batch size")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's; "
                   "ONNX: float32 only)")
    p.add_argument("--size", type=_size, metavar="H[,W]", help="input height and width "
                   "(default: the weights' own, 224 or SSD's 300)")
    p.add_argument("--rtol", type=_rtol, help="verification tolerance on max |diff| / max "
                   "|Flax output| (default 1e-4; bfloat16 3e-2, float16 1e-2)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)

    try:
        fmt = format_for(args.out, args.format)  # before loading anything
        _check_out(args.out, args.force)
        if fmt == "onnx":
            check_onnx(args.dtype or "float32")
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        overrides = {"dtype": jnp.dtype(args.dtype)} if args.dtype else {}
        info, module, variables = weights_argument(args.weights, **overrides)
        name = info["name"]
    except (OSError, ValueError) as err:  # CheckpointError, WeightsUnavailableError, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = args.size or registry.metadata(name)["input_size"][:2]
    try:
        summary = export(module, variables, args.out, fmt, batch=args.batch, size=size,
                         rtol=args.rtol, force=args.force, label=name)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    if not summary.verification.ok:
        print(f"error: the {fmt} file disagrees with the Flax model beyond the tolerance; "
              f"nothing was written at {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
