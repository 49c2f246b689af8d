"""LPIPS (net='vgg', v0.1): vgg_flax against the lpips package, forward and input gradient.

    PYTHONPATH=. python benchmarks/lpips_precision.py [--seeds 3] [--size 64]

lpips' random trunk (pnet_rand=True, seeded, biases made non-zero) and its published linear
weights. Prints, per seed, the forward max |diff| / max |lpips| for conv="auto" and "xla", and
each float32 gradient's distance ||g - g64|| / ||g64|| from lpips run in float64 (torch float32
alongside): the issue asks vgg_flax to be no further than torch float32.
"""
import argparse
import copy

import jax
import lpips as LP
import numpy as np
import torch

from vgg_flax import lpips, weights


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    print(f"{'seed':>4} {'fwd auto':>9} {'fwd xla':>9} {'grad torch32':>12} {'grad auto':>10} {'grad xla':>10}")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        ref = LP.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
        with torch.no_grad():
            for n, q in ref.net.named_parameters():
                if n.endswith("bias"):
                    q.uniform_(-0.1, 0.1)
        trunk = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
        params = lpips.params(weights.from_torch(trunk, "vgg16", include_top=False))
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1, 1, (3, args.size, args.size, 3)).astype(np.float32)
        y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)

        def t(a, dt=torch.float32):
            return torch.from_numpy(a.transpose(0, 3, 1, 2)).to(dt)
        with torch.no_grad():
            want = ref(t(x), t(y)).numpy().reshape(-1)

        def tgrad(model, dt):
            xt = t(x, dt).requires_grad_(True)
            model(xt, t(y, dt)).sum().backward()
            return xt.grad.numpy().transpose(0, 2, 3, 1).astype(np.float64)
        g64 = tgrad(copy.deepcopy(ref).double(), torch.float64)
        g32 = tgrad(ref, torch.float32)

        def dist(g):
            return np.linalg.norm(g - g64) / np.linalg.norm(g64)
        row = {}
        for conv in ("auto", "xla"):
            with jax.default_matmul_precision("highest"):
                d = np.asarray(jax.jit(lambda a, b: lpips.distance(params, a, b, conv=conv))(x, y))
                g = jax.jit(jax.grad(lambda a: lpips.distance(params, a, y, conv=conv).sum()))(x)
            row[conv] = (np.abs(d - want).max() / np.abs(want).max(), dist(np.asarray(g, np.float64)))
        print(f"{seed:>4} {row['auto'][0]:>9.1e} {row['xla'][0]:>9.1e} {dist(g32):>12.3e} "
              f"{row['auto'][1]:>10.3e} {row['xla'][1]:>10.3e}")


if __name__ == "__main__":
    main()
