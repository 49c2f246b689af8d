"""Where a VGG-16 step spends its time: each convolution and pool, XLA:CPU against torch.

    python benchmarks/layers.py --batch 8 --dtype fp32 bf16

For every distinct VGG-16 convolution shape (each with its bias and ReLU, as a VGG layer runs):
XLA's convolution forward, input gradient and weight gradient (plain ``jax.jit``); the forward
and forward + all gradients as vgg_flax's layers compute them (``vgg_flax.onednn.conv``: oneDNN
where it is built, ReLU applied as oneDNN writes the output and float32 parameters rounded inside
the kernel reorder); the same forward with those two levers off (ReLU as a separate XLA pass;
parameters cast to the compute dtype before the call); against torch's forward and forward +
backward (channels_last; ``torch.autocast`` for bf16). Then the 2x2 max pool's gradient:
``lax.reduce_window``'s (a select-and-scatter) against vgg_flax's. Best of ``--reps`` runs,
milliseconds, and totals weighted by how often VGG-16 uses each shape.
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
    import numpy as np
    import torch

    from vgg_flax import onednn
    from vgg_flax.layers import max_pool_2x2

    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    pad = ((1, 1), (1, 1))
    # XLA's convolution, and vgg_flax's layer: (x, float32 kernel and bias) -> ReLU(conv + b)
    conv = lambda x, w: onednn.conv(x, w, padding=pad, impl="xla")  # noqa: E731
    layer = lambda x, w, b: onednn.conv(x, w, b, padding=pad, relu=True)  # noqa: E731
    jit = jax.jit
    fwd = jit(conv)
    ours = jit(layer)
    relu_apart = jit(lambda x, w, b: jnp.maximum(onednn.conv(x, w, b, padding=pad), 0))
    cast_apart = jit(lambda x, w, b: layer(x, w.astype(x.dtype), b.astype(x.dtype)))

    @jit
    def ours_train(x, w, b, g):
        y, vjp = jax.vjp(layer, x, w, b)
        return y, vjp(g)
    dx = jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    rows = []
    rng = np.random.default_rng(0)

    def normal(shape, dtype=np.float32, scale=1.0):
        # numpy, not jax.random: one XLA compilation per shape (~0.4 s each) is most of a small run
        return jnp.asarray((rng.standard_normal(shape, np.float32) * scale).astype(dtype))

    for h, cin, cout, count in VGG16_CONVS:
        h = h * size // 224
        x = normal((batch, h, h, cin), jdt)
        w32 = normal((3, 3, cin, cout), scale=0.05)
        b32 = normal((cout,), scale=0.05)
        w = w32.astype(jdt)
        g = normal((batch, h, h, cout), jdt)
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
                 vgg_flax_fwd=best_of(lambda: jax.block_until_ready(ours(x, w32, b32)), reps),
                 relu_apart=best_of(lambda: jax.block_until_ready(relu_apart(x, w32, b32)),
                                    reps),
                 cast_apart=best_of(lambda: jax.block_until_ready(cast_apart(x, w32, b32)),
                                    reps),
                 xla_dx=best_of(lambda: jax.block_until_ready(dx(x, w, g)), reps),
                 xla_dw=best_of(lambda: jax.block_until_ready(dw(x, w, g)), reps),
                 vgg_flax_fwd_dx_dw=best_of(
                     lambda: jax.block_until_ready(ours_train(x, w32, b32, g)), reps),
                 torch_fwd=best_of(t_fwd, reps), torch_fwd_bwd=best_of(t_train, reps))
        r["xla_fwd_dx_dw"] = r["xla_fwd"] + r["xla_dx"] + r["xla_dw"]
        rows.append(r)
    reduce_window = jit(lambda x, g: jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), x)[1](g)[0])
    ours_pool = jit(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0])
    for h, c in VGG16_POOLS:
        h = h * size // 224
        x = jnp.maximum(normal((batch, h, h, c), jdt), 0)
        g = normal((batch, h // 2, h // 2, c), jdt)
        rows.append(dict(layer=f"max pool {h}x{h}x{c} backward", count=1,
                         reduce_window=best_of(lambda: jax.block_until_ready(reduce_window(x, g)), reps),
                         vgg_flax=best_of(lambda: jax.block_until_ready(ours_pool(x, g)), reps)))
    return rows


def markdown(rows: list[dict], title: str) -> str:
    convs = [r for r in rows if r["layer"].startswith("conv")]
    pools = [r for r in rows if not r["layer"].startswith("conv")]
    cols = ["xla_fwd", "vgg_flax_fwd", "relu_apart", "cast_apart", "torch_fwd", "xla_dx",
            "xla_dw", "xla_fwd_dx_dw", "vgg_flax_fwd_dx_dw", "torch_fwd_bwd"]
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
    p.add_argument("--json", default="benchmarks/results/layers.json")
    p.add_argument("--md", default="benchmarks/results/layers.md")
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
    sys.exit(main())
