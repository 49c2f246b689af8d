"""Side-by-side speed of vgg_flax and torchvision, measured in one process, interleaved.

    python benchmarks/bench.py                       # vgg16, batch 1/8/32, fp32+bf16, infer+train
    python benchmarks/bench.py --model vgg19_bn --batch 8 --dtype bf16 --mode infer
    python benchmarks/bench.py --levers              # also time each vgg_flax compiler lever

For every (mode, dtype, batch) both frameworks are built and warmed up, then timed in
alternation (torch, flax, torch, flax, ...) so that drift in machine load hits both alike.
torchvision runs in both memory formats (and under bf16 autocast for bf16); the faster one is
the baseline. Reports median img/s, the ratio vgg_flax/torchvision, achieved GFLOP/s (a
multiply-add is two FLOPs; a training step is counted as three forward passes) against the
machine's measured matmul peak, first-call time (for Flax: trace + compile + first run), and
memory. Writes JSON and a markdown table.
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


def measure_peak_gflops(dtype: str, device: str) -> float:
    """The best matmul throughput torch or XLA reaches here: the ceiling we compare against.

    Square products large enough to run at full speed, warmed up, best of several.
    """
    import jax
    import jax.numpy as jnp
    import torch
    n = 4096 if device == "cpu" else 8192
    flops = 2 * n ** 3
    best = 0.0
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for i in range(4):
        t0 = time.perf_counter()
        c = a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    del a, b, c
    jdt = jnp.float32 if dtype == "fp32" else jnp.bfloat16
    x = jnp.ones((n, n), jdt)
    mm = jax.jit(jnp.matmul)
    mm(x, x).block_until_ready()
    for _ in range(3):
        t0 = time.perf_counter()
        mm(x, x).block_until_ready()
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


# -- torchvision ----------------------------------------------------------------------------
def torch_candidates(name, mode, dtype, batch, size, device, num_classes) -> list[Candidate]:
    import torch
    import torchvision
    from torch import nn

    out = []
    for fmt in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=num_classes).to(device)
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
def flax_candidates(name, mode, dtype, batch, size, num_classes, levers) -> list[Candidate]:
    import jax
    import jax.numpy as jnp
    import optax

    import vgg_flax
    from vgg_flax import perf

    jdtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    model = vgg_flax.create(name, num_classes=num_classes, dtype=jdtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, batch))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    settings = {"vgg_flax": perf.compiler_options()}
    xla_convs = "vgg_flax, XLA's convolutions (VGG_FLAX_CONV=xla)"
    if levers:
        settings = {"vgg_flax (XLA defaults)": None, **perf.levers(),
                    xla_convs: perf.compiler_options(), **settings}

    out = []
    for label, options in settings.items():
        # the convolution is chosen when the step is traced (below, before the first call):
        # the lever rows measure XLA's own convolutions, "vgg_flax" what the library runs
        conv_env = os.environ.get("VGG_FLAX_CONV")
        if label != "vgg_flax":
            os.environ["VGG_FLAX_CONV"] = "xla"
        if mode == "infer":
            fn = jax.jit(model.apply, compiler_options=options)
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

            fn = jax.jit(train_step, donate_argnums=0, compiler_options=options)
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
            os.environ.pop("VGG_FLAX_CONV", None)
            if conv_env is not None:
                os.environ["VGG_FLAX_CONV"] = conv_env
        c = Candidate("vgg_flax", label, step, first_call_s=time.perf_counter() - t0)
        if mem is not None:
            c.xla_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
        out.append(c)
    return out


def run_config(args, mode, dtype, batch, peak) -> list[dict]:
    from vgg_flax import create
    from vgg_flax.model import count_macs

    size = tuple(args.size)
    cands = [] if args.no_torch else torch_candidates(args.model, mode, dtype, batch, size,
                                                      args.device, args.num_classes)
    for c in cands:  # torch's first call (allocator warm-up, oneDNN primitive creation)
        t0 = time.perf_counter()
        c.step()
        c.first_call_s = time.perf_counter() - t0
    cands += flax_candidates(args.model, mode, dtype, batch, size, args.num_classes, args.levers)
    for _ in range(args.warmup):
        for c in cands:
            c.step()
    for _ in range(args.reps):
        for c in cands:
            with PeakRSS() as p:
                t0 = time.perf_counter()
                c.step()
                c.times.append(time.perf_counter() - t0)
            c.transient_mb = max(c.transient_mb, p.mb)

    macs = count_macs(create(args.model, num_classes=args.num_classes), (batch, *size, 3))
    flops = 2 * macs * (3 if mode == "train" else 1)
    torch_best = max((c for c in cands if c.framework == "torchvision"),
                     key=lambda c: -statistics.median(c.times), default=None)
    rows = []
    for c in cands:
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
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--mode", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--levers", action="store_true", help="also time each compiler lever alone, on XLA's convolutions")
    p.add_argument("--no-torch", action="store_true", help="vgg_flax only (no torch installed)")
    p.add_argument("--json", default="benchmarks/results.json")
    p.add_argument("--md", default="benchmarks/results.md")
    args = p.parse_args(argv)

    import jax
    import vgg_flax
    from vgg_flax import onednn, perf
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
                   host_malloc="tuned" if perf.host_malloc_tuned() else "default",
                   onednn=onednn.version() or onednn.why_unavailable())
    print("machine:", json.dumps(machine), flush=True)
    rows = []
    for dtype in args.dtype:
        peak = measure_peak_gflops(dtype, args.device) if not args.no_torch else float("nan")
        print(f"measured {dtype} matmul peak: {peak:.0f} GFLOP/s", flush=True)
        for mode in args.mode:
            for batch in args.batch:
                new = run_config(args, mode, dtype, batch, peak)
                rows += new
                print(markdown(new).split("\n", 2)[2], flush=True)
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


if __name__ == "__main__":
    from vgg_flax import perf
    perf.exec_with_tuned_host_malloc()  # for both frameworks alike: VGG_FLAX_MALLOC=default to compare untuned
    sys.exit(main())
