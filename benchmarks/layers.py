"""Where a VGG-16 step spends its time: each convolution and pool, XLA:CPU against torch.

    python benchmarks/layers.py --batch 8 --dtype fp32 bf16

For every distinct VGG-16 convolution shape: the forward convolution, its input gradient and its
weight gradient as XLA compiles them (with ``vgg_flax.perf.compiler_options()``), the forward and
forward + both gradients as vgg_flax's modules compute them (``perf.conv_general_dilated()``:
oneDNN's convolutions where ``vgg_flax.onednn`` is built), against torch's forward and forward +
backward (channels_last; ``torch.autocast`` for bf16). Then the 2x2 max
pool's gradient: ``lax.reduce_window``'s (a select-and-scatter) against vgg_flax's. Best of
``--reps`` runs, milliseconds, and totals weighted by how often VGG-16 uses each shape. This is
the evidence behind the README's "what limits us".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# (spatial size at 224 input, in channels, out channels, how many VGG-16 layers have the shape)
VGG16_CONVS = [(224, 3, 64, 1), (224, 64, 64, 1), (112, 64, 128, 1), (112, 128, 128, 1),
               (56, 128, 256, 1), (56, 256, 256, 2), (28, 256, 512, 1), (28, 512, 512, 2),
               (14, 512, 512, 3)]
VGG16_POOLS = [(224, 64), (112, 128), (56, 256), (28, 512), (14, 512)]


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def measure(batch: int, dtype: str, size: int, reps: int) -> list[dict]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    from vgg_flax import perf
    from vgg_flax.model import max_pool_2x2

    opts = perf.compiler_options()
    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jit = lambda f: jax.jit(f, compiler_options=opts)  # noqa: E731
    fwd = jit(conv)
    # what vgg_flax's modules run: perf.conv_general_dilated() (oneDNN where built)
    vgg_conv = lambda x, w: (perf.conv_general_dilated() or lax.conv_general_dilated)(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
    ours = jit(vgg_conv)

    @jit
    def ours_train(x, w, g):
        y, vjp = jax.vjp(vgg_conv, x, w)
        return y, vjp(g)
    dx = jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    rows = []
    key = jax.random.key(0)
    for h, cin, cout, count in VGG16_CONVS:
        h = h * size // 224
        x = jax.random.normal(key, (batch, h, h, cin), jdt)
        w = (jax.random.normal(key, (3, 3, cin, cout)) * 0.05).astype(jdt)
        g = jax.random.normal(key, (batch, h, h, cout), jdt)
        tx = torch.randn(batch, cin, h, h).to(memory_format=torch.channels_last).requires_grad_()
        tw = torch.randn(cout, cin, 3, 3).mul_(0.05).requires_grad_()
        tg = torch.randn(batch, cout, h, h).to(memory_format=torch.channels_last)

        def t_fwd():
            with torch.no_grad(), autocast():
                torch.nn.functional.conv2d(tx, tw, padding=1)

        def t_train():
            with autocast():
                y = torch.nn.functional.conv2d(tx, tw, padding=1)
            y.backward(tg.to(y.dtype))

        r = dict(layer=f"conv {h}x{h} {cin}->{cout}", count=count,
                 xla_fwd=best_of(lambda: jax.block_until_ready(fwd(x, w)), reps),
                 vgg_flax_fwd=best_of(lambda: jax.block_until_ready(ours(x, w)), reps),
                 xla_dx=best_of(lambda: jax.block_until_ready(dx(x, w, g)), reps),
                 xla_dw=best_of(lambda: jax.block_until_ready(dw(x, w, g)), reps),
                 vgg_flax_fwd_dx_dw=best_of(lambda: jax.block_until_ready(ours_train(x, w, g)),
                                            reps),
                 torch_fwd=best_of(t_fwd, reps), torch_fwd_bwd=best_of(t_train, reps))
        r["xla_fwd_dx_dw"] = r["xla_fwd"] + r["xla_dx"] + r["xla_dw"]
        rows.append(r)
    reduce_window = jit(lambda x, g: jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), x)[1](g)[0])
    ours_pool = jit(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0])
    for h, c in VGG16_POOLS:
        h = h * size // 224
        x = jax.nn.relu(jax.random.normal(key, (batch, h, h, c), jdt))
        g = jax.random.normal(key, (batch, h // 2, h // 2, c), jdt)
        rows.append(dict(layer=f"max pool {h}x{h}x{c} backward", count=1,
                         reduce_window=best_of(lambda: jax.block_until_ready(reduce_window(x, g)), reps),
                         vgg_flax=best_of(lambda: jax.block_until_ready(ours_pool(x, g)), reps)))
    return rows


def markdown(rows: list[dict], title: str) -> str:
    convs = [r for r in rows if r["layer"].startswith("conv")]
    pools = [r for r in rows if not r["layer"].startswith("conv")]
    cols = ["xla_fwd", "vgg_flax_fwd", "torch_fwd", "xla_dx", "xla_dw", "xla_fwd_dx_dw",
            "vgg_flax_fwd_dx_dw", "torch_fwd_bwd"]
    out = [f"{title}", "", "| layer | x | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in convs:
        out.append(f"| {r['layer']} | {r['count']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    out.append("| **VGG-16 total** | | " + " | ".join(
        f"**{sum(r[c] * r['count'] for r in convs):.0f}**" for c in cols) + " |")
    out += ["", "| pool | reduce_window backward | vgg_flax backward |", "|---|---:|---:|"]
    out += [f"| {r['layer']} | {r['reduce_window']:.1f} | {r['vgg_flax']:.1f} |" for r in pools]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--size", type=int, default=224, help="input size the layer shapes scale from")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default="benchmarks/layers.json")
    p.add_argument("--md", default="benchmarks/layers.md")
    args = p.parse_args(argv)
    if args.size % 32 or args.size < 32:
        p.error(f"--size must be a multiple of 32 (VGG halves it five times), got {args.size}")
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    results, tables = {}, []
    for dtype in args.dtype:
        rows = measure(args.batch, dtype, args.size, args.reps)
        results[dtype] = rows
        tables.append(markdown(rows, f"{dtype}, batch {args.batch}, {args.size}x{args.size} "
                                     "input, best-of ms"))
        print(tables[-1], "\n", flush=True)
    for path, text in ((args.json, json.dumps(dict(batch=args.batch, size=args.size, rows=results),
                                              indent=1)), (args.md, "\n\n".join(tables) + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.tmp").write_text(text)
        Path(f"{path}.tmp").replace(path)
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    from vgg_flax import perf
    perf.exec_with_tuned_host_malloc()
    sys.exit(main())
