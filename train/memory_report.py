"""Per-device memory of a training state (params + optimizer + BN stats) under different layouts,
from XLA's memory analysis of the compiled sharded init, and with ``--batch`` of one compiled
training step (activations, gradients) with the bytes its collectives move (nothing runs):

    python train/memory_report.py [--config train/configs/imagenet_vgg16.py] [--devices 8] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "imagenet_vgg16.py"))
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices to lay out over")
    parser.add_argument("--batch", type=int, default=0,
                        help="also compile a training step at this global batch size")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from train import trainer
    n = args.devices
    layouts = [("replicated", dict(data=n, model=1, fsdp=False)),
               ("FSDP", dict(data=n, model=1, fsdp=True)),
               ("fc6/fc7 tensor-parallel (model=2)", dict(data=n // 2, model=2, fsdp=False)),
               ("FSDP + tensor-parallel (model=2)", dict(data=n // 2, model=2, fsdp=True))]
    head = f"{'layout':38s} {'mesh':>9s} {'per device MiB':>15s} {'total state MiB':>16s}"
    if args.batch:
        head += f" {'step temp MiB':>14s} {'collectives MiB/step':>21s}"
    print(head)
    for name, lay in layouts:
        c = trainer.load_config(args.config)
        c.mesh.data, c.mesh.model = lay["data"], lay["model"]
        c.sharding.fsdp = lay["fsdp"]
        m = trainer.state_memory(c)
        line = (f"{name:38s} {lay['data']:>4d}x{lay['model']:<4d} "
                f"{m['per_device_output_bytes'] / 2**20:15.1f} {m['state_bytes_total'] / 2**20:16.1f}")
        if args.batch:
            s = trainer.step_memory(c, args.batch)
            comm = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in s["collectives"].items() if v)
            line += f" {s['temp_bytes'] / 2**20:14.1f} {sum(s['collectives'].values()) / 2**20:8.1f} ({comm})"
        print(line)
    print(f"({c.model}, {c.optimizer.name} momentum={c.optimizer.momentum}, fp32 state; "
          "per device = XLA memory_analysis().output_size_in_bytes of jit(init, out_shardings); "
          "step temp = temp_size_in_bytes of the compiled training step at --batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
