"""Side-by-side speed of vgg_flax and torchvision, measured in one process, interleaved.

    python benchmarks/bench.py                       # vgg16, batch 8/32, fp32+bf16, infer+train
    python benchmarks/bench.py --model vgg19_bn --batch 8 --dtype bf16 --mode infer
    python benchmarks/bench.py --levers              # also each vgg_flax performance lever off

For every (mode, dtype, batch) both frameworks are built and warmed up, then timed in
alternation (torch, flax, torch, flax, ...) so that drift in machine load hits both alike.
torchvision runs in both memory formats (and under bf16 autocast for bf16); the faster one is
the baseline. The first vgg_flax row is what a user gets: ``vgg_flax.create(name, dtype=...)``
with the torchvision model's weights as ``vgg_flax.from_torch`` returns them, under a plain
``jax.jit`` (a training step donating its state), no compiler options, no environment
variables. ``--levers`` adds rows with one lever turned off each, so every lever
shows its gain here. Reports median img/s, the ratio vgg_flax/torchvision, achieved GFLOP/s (a
multiply-add is two FLOPs; a training step is counted as three forward passes) against a matmul
peak measured in the same run, between the timed rounds, first-call time (for Flax: trace +
compile + first run), and memory. Writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclasses.dataclass
class Candidate:
    framework: str
    label: str
    step: Callable[[], Any]          # one timed call, blocking until done
    first_call_s: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)
    transient_mb: float = 0.0
    xla_mb: float | None = None


def peak_candidates(dtype: str, device: str, no_torch: bool, n: int) -> list[Candidate]:
    """Square n x n matmuls in torch and XLA, timed in the same rounds as the models: the
    ceiling "% of peak" is measured against, under the same machine load (the faster median
    wins)."""
    import jax
    import jax.numpy as jnp
    out = []
    x = jnp.ones((n, n), jnp.float32 if dtype == "fp32" else jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    out.append(Candidate("peak", "matmul (XLA)", lambda: mm(x, x).block_until_ready()))
    if not no_torch:
        import torch
        if dtype == "bf16" and device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            # without AVX-512 torch multiplies bf16 in a scalar loop (~14 s for 2048^2): that is
            # no ceiling, and XLA's (bf16 widened to float32) stands for the machine
            return out
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dt)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        out.append(Candidate("peak", "matmul (torch)", lambda: (a @ a, sync())))
    return out


# -- torchvision ----------------------------------------------------------------------------
TORCHVISION_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


_TORCH_MODELS: dict = {}


def torchvision_model(name: str, num_classes: int, width: float):
    """A fresh copy of torchvision's model (built and initialised once per process: each
    configuration trains its own copy). Under a width multiplier, torchvision's own VGG and
    make_layers on the scaled channel counts (as vgg_flax scales them), fc6 taking the narrower
    features."""
    import copy
    return copy.deepcopy(_torchvision_master(name, num_classes, width))


def _torchvision_master(name: str, num_classes: int, width: float):
    """The process's one initialised torchvision model for these fields (never trained)."""
    key = (name, num_classes, width)
    if key not in _TORCH_MODELS:
        _TORCH_MODELS[key] = _build_torchvision_model(name, num_classes, width)
    return _TORCH_MODELS[key]


def _build_torchvision_model(name: str, num_classes: int, width: float):
    import torch
    import torchvision
    from torch import nn
    from torchvision.models import vgg as tv
    from vgg_flax.arch import scale
    if width == 1:
        return torchvision.models.get_model(name, num_classes=num_classes)
    letter = TORCHVISION_CFG[name.removesuffix("_bn")]
    cfg = [v if v == "M" else scale(v, width) for v in tv.cfgs[letter]]
    with torch.device("meta"):  # VGG() would first initialise the full-size fc6 (103M weights)
        model = tv.VGG(tv.make_layers(cfg, batch_norm=name.endswith("_bn")),
                       num_classes=num_classes, init_weights=False)
        model.classifier[0] = nn.Linear(cfg[-2] * 7 * 7, model.classifier[0].out_features)
    model = model.to_empty(device="cpu")
    for m in model.modules():  # torch's default initialisation (values do not change timings)
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def torch_candidates(name, mode, dtype, batch, size, device, num_classes,
                     width) -> list[Candidate]:
    import torch
    from torch import nn

    out = []
    for fmt in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        model = torchvision_model(name, num_classes, width).to(device)
        memfmt = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=memfmt)
        x = torch.randn(batch, 3, *size, device=device).to(memory_format=memfmt)
        y = torch.randint(0, num_classes, (batch,), device=device)
        autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bf16" \
            else (lambda: torch.autocast(device, enabled=False))
        sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
        if mode == "infer":
            model.eval()

            def step(model=model, x=x):
                with torch.inference_mode(), autocast():
                    model(x)
                sync()
        else:
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            loss_fn = nn.CrossEntropyLoss()

            def step(model=model, x=x, y=y, opt=opt):
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
        label = f"torchvision {fmt}" + (" autocast-bf16" if dtype == "bf16" else "")
        out.append(Candidate("torchvision", label, step))
    return out


# -- vgg_flax -------------------------------------------------------------------------------
USER = "vgg_flax (plain jax.jit)"


def _reduce_window_pool(x, ceil_mode=False):
    # the lever row's 2x2 pool: what nn.max_pool gives (a reduce-window; select-and-scatter
    # gradient) instead of vgg_flax's two maxima and its custom JVP
    import flax.linen as nn
    pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2)) if ceil_mode else "VALID"
    return nn.max_pool(x, (2, 2), (2, 2), padding=pad)


_VARIABLES: dict = {}


def flax_candidates(name, mode, dtype, batch, size, num_classes, levers,
                    width=1.0, no_torch=False) -> list[Candidate]:
    import jax
    import jax.numpy as jnp
    import optax

    import vgg_flax
    from vgg_flax import layers as layers_lib, model as model_lib

    jdtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    model = vgg_flax.create(name, num_classes=num_classes, dtype=jdtype, width=width)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, batch))
    # Parameters are float32 whatever the compute dtype: made once per model, not once per
    # (mode, dtype) configuration. The user's variables are what from_torch returns (as the
    # README shows) for torchvision's model; without torch, the model's own init.
    key = (name, num_classes, width, tuple(size))
    if key not in _VARIABLES and no_torch:
        init = jax.jit(model.init, compiler_options=model_lib.init_compiler_options())
        _VARIABLES[key] = init(jax.random.key(0), x[:1])
    elif key not in _VARIABLES:
        master = _torchvision_master(name, num_classes, width)
        _VARIABLES[key] = vgg_flax.from_torch(master.state_dict(), model)
    variables = _VARIABLES[key]
    # label -> (module, 2x2 pool): the user's row, then one lever off per row
    settings = {USER: (model, layers_lib.max_pool_2x2)}
    if levers:
        settings["lever off: XLA's convolutions (conv='xla')"] = (
            model.clone(conv="xla"), layers_lib.max_pool_2x2)
        settings["lever off: 2x2 pool as nn.max_pool"] = (model, _reduce_window_pool)

    out = []
    for label, (model, pool) in settings.items():
        # layers.stateless looks the pool up when the step is traced (below, before the first call)
        layers_lib.max_pool_2x2, own_pool = pool, layers_lib.max_pool_2x2
        if mode == "infer":
            fn = jax.jit(model.apply)
            args = (variables, x)
        else:
            tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1e-3, momentum=0.9))
            params = variables["params"]
            state = (params, variables.get("batch_stats", {}), tx.init(params))

            def train_step(state, x, y, key):
                params, stats, opt_state = state

                def loss_fn(p):
                    logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                              mutable=["batch_stats"], rngs={"dropout": key})
                    loss = optax.softmax_cross_entropy_with_integer_labels(
                        logits.astype(jnp.float32), y).mean()
                    return loss, upd.get("batch_stats", {})

                (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), stats, opt_state), loss

            fn = jax.jit(train_step, donate_argnums=0)
            # each candidate trains its own copy: donation invalidates the buffers it is given
            args = [jax.tree.map(jnp.copy, state), x, y, jax.random.key(1)]

        def step(fn=fn, args=args, mode=mode):
            if mode == "infer":
                jax.block_until_ready(fn(*args))
            else:
                args[0], loss = fn(*args)
                jax.block_until_ready(loss)

        t0 = time.perf_counter()
        try:
            compiled = fn.lower(*args).compile()
            mem = compiled.memory_analysis()
            step()
        finally:
            layers_lib.max_pool_2x2 = own_pool
        c = Candidate("vgg_flax", label, step, first_call_s=time.perf_counter() - t0)
        if mem is not None:
            c.xla_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
        out.append(c)
    return out


def run_config(args, mode, dtype, batch) -> list[dict]:
    from vgg_flax import create
    from vgg_flax.model import count_macs

    size = tuple(args.size)
    cands = [] if args.no_torch else torch_candidates(args.model, mode, dtype, batch, size,
                                                      args.device, args.num_classes, args.width)
    cands += peak_candidates(dtype, args.device, args.no_torch, args.peak_size)
    for c in cands:  # first calls (allocator warm-up, oneDNN primitive creation, compiling)
        t0 = time.perf_counter()
        c.step()
        c.first_call_s = time.perf_counter() - t0
    cands += flax_candidates(args.model, mode, dtype, batch, size, args.num_classes, args.levers,
                             args.width, args.no_torch)
    for _ in range(args.warmup):
        for c in cands:
            c.step()
    for _ in range(args.reps):
        for c in cands:
            t0 = time.perf_counter()
            c.step()
            c.times.append(time.perf_counter() - t0)
    # Memory in one more, untimed, call: a sampling thread waking every millisecond takes a
    # core's share from the step it watches (measured: 2.32 against 2.53 img/s on 2 cores).
    for c in cands:
        with PeakRSS() as p:
            c.step()
        c.transient_mb = p.mb

    macs = count_macs(create(args.model, num_classes=args.num_classes, width=args.width),
                      (batch, *size, 3))
    flops = 2 * macs * (3 if mode == "train" else 1)
    torch_best = max((c for c in cands if c.framework == "torchvision"),
                     key=lambda c: -statistics.median(c.times), default=None)
    peak = max(2 * args.peak_size ** 3 / statistics.median(c.times) / 1e9
               for c in cands if c.framework == "peak")
    rows = []
    for c in cands:
        if c.framework == "peak":
            continue
        t = statistics.median(c.times)
        rows.append(dict(
            model=args.model, mode=mode, dtype=dtype, batch=batch, size=list(size),
            framework=c.framework, config=c.label, img_s=batch / t, median_s=t,
            min_s=min(c.times), reps=len(c.times),
            ratio_vs_torch_best=(statistics.median(torch_best.times) / t) if torch_best else None,
            torch_best=torch_best.label if torch_best else None,
            gflop_s=flops / t / 1e9, peak_gflop_s=peak, frac_of_peak=flops / t / 1e9 / peak,
            first_call_s=c.first_call_s, transient_peak_mb=c.transient_mb, xla_memory_mb=c.xla_mb,
        ))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | mode | dtype | batch | config | img/s | vs torch best | GFLOP/s | "
            "% of peak | first call s | peak MB |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        ratio = f"{r['ratio_vs_torch_best']:.2f}x" if r["ratio_vs_torch_best"] else "-"
        mem = r["xla_memory_mb"] if r["xla_memory_mb"] is not None else r["transient_peak_mb"]
        lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['config']} "
                     f"| {r['img_s']:.2f} | {ratio} | {r['gflop_s']:.0f} | "
                     f"{100 * r['frac_of_peak']:.0f}% | {r['first_call_s']:.1f} | {mem:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--mode", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier of both frameworks' models (a small model for smoke "
                        "tests; figures are at 1)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-size", type=int, default=2048, metavar="N",
                   help="the N x N matmul \"%% of peak\" is measured against (smaller for "
                        "smoke runs)")
    p.add_argument("--levers", action="store_true",
                   help="also time vgg_flax with each performance lever turned off")
    p.add_argument("--no-torch", action="store_true", help="vgg_flax only (no torch installed)")
    p.add_argument("--json", default="benchmarks/results/bench.json")
    p.add_argument("--md", default="benchmarks/results/bench.md")
    args = p.parse_args(argv)
    if (args.width != 1 and not args.no_torch
            and args.model.removesuffix("_bn") not in TORCHVISION_CFG):
        p.error(f"--width applies to torchvision's models ({', '.join(TORCHVISION_CFG)}, and "
                f"_bn), not {args.model}; or pass --no-torch")
    if args.peak_size < 1:
        p.error(f"--peak-size must be a positive size, got {args.peak_size}")

    import jax
    import vgg_flax
    from vgg_flax import onednn
    if args.model not in vgg_flax.list_models() or vgg_flax.metadata(args.model)["head"] != "fc":
        p.error(f"--model must be a classifier, one of {', '.join(vgg_flax.list_models()[:10])}")
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        args.device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    except ImportError:
        if not args.no_torch:
            p.error("torch is not installed: pip install -e '.[convert]', or pass --no-torch")
        args.device = "cpu"

    machine = dict(platform=platform.platform(), processor=_cpu_name(), cores=os.cpu_count(),
                   jax=jax.__version__, backend=jax.default_backend(), device=args.device,
                   torch=None if args.no_torch else __import__("torch").__version__,
                   onednn=onednn.version() or onednn.why_unavailable(),
                   onednn_backward_layout=onednn.backward_layout(),
                   env={k: v for k, v in os.environ.items()
                        if k.startswith(("XLA_", "VGG_FLAX_", "MALLOC_", "OMP_"))})
    print("machine:", json.dumps(machine), flush=True)
    rows = []
    for dtype in args.dtype:
        for mode in args.mode:
            for batch in args.batch:
                new = run_config(args, mode, dtype, batch)
                if args.levers and not args.no_torch:
                    new += malloc_lever_row(args, mode, dtype, batch, new)
                rows += new
                print(markdown(new).split("\n", 2)[2], flush=True)
    machine["host_malloc"] = vgg_flax.HOST_MALLOC  # what import vgg_flax did
    table = markdown(rows)
    for path, text in ((args.json, json.dumps(dict(machine=machine, rows=rows), indent=1)),
                       (args.md, table + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(table)
    print(f"wrote {args.json} and {args.md}")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def malloc_lever_row(args, mode, dtype, batch, rows) -> list[dict]:
    """vgg_flax's user row again with glibc's malloc defaults (``VGG_FLAX_MALLOC=default``):
    mallopt is process-wide, so this runs in a child process, after the interleaved rounds."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(batch),
               "--dtype", dtype, "--mode", mode, "--size", *map(str, args.size),
               "--num-classes", str(args.num_classes), "--width", str(args.width),
               "--reps", str(args.reps), "--warmup", str(args.warmup), "--no-torch",
               "--json", f"{tmp}/r.json", "--md", f"{tmp}/r.md"]
        subprocess.run(cmd, check=True, env={**os.environ, "VGG_FLAX_MALLOC": "default"},
                       stdout=subprocess.DEVNULL)
        row = json.loads(Path(f"{tmp}/r.json").read_text())["rows"][0]
    user = next(r for r in rows if r["config"] == USER)
    row["config"] = "lever off: glibc malloc defaults (child process, not interleaved)"
    row["ratio_vs_torch_best"] = user["ratio_vs_torch_best"] * row["img_s"] / user["img_s"]
    row["torch_best"] = user["torch_best"]
    return [row]


if __name__ == "__main__":
    sys.exit(main())
