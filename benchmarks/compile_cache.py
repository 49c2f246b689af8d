"""Compile time of the trainer's training step on N (fake CPU) devices, and whether a second
process reads it from the persistent compilation cache (docs/performance.md, "Restarts"):

    python benchmarks/compile_cache.py --config train/configs/digits.py --devices 8 --cache /tmp/c
    python benchmarks/compile_cache.py --config train/configs/digits.py --devices 8 --cache /tmp/c

Run it twice with the same ``--cache``: the second process's "cache hits 1" is a program read
from disk; a multi-device step holding oneDNN convolutions misses every time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="train/configs/digits.py")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--conv", default="auto", choices=("auto", "onednn", "xla"))
    p.add_argument("--cache", required=True, help="the compilation cache directory")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from train import compile_cache, trainer
    from train.memory import _abstract_step
    compile_cache.use(Path(args.cache).absolute())
    c = trainer.load_config(args.config)
    c.mesh.data, c.mesh.model = args.devices, 1
    c.model_overrides.conv = args.conv
    channels = 1 if c.dataset == "digits" else 3
    counter = compile_cache.counter()
    t0 = time.perf_counter()
    _, step, abstract = _abstract_step(trainer.resolved(c), args.batch, 10, channels)
    lowered = step.lower(*abstract)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"{Path(args.config).name} devices={args.devices} conv={args.conv} batch={args.batch}: "
          f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, cache hits {counter.hits}, "
          f"misses {counter.misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
