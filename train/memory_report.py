"""Per-device memory of a training state (params + optimizer + BN stats) under different layouts,
from XLA's memory analysis of the compiled sharded init, and with ``--batch`` of one compiled
training step (activations, gradients) with the bytes its collectives move (nothing runs). The
devices are fake CPU devices, so a pod's mesh needs no pod:

    python train/memory_report.py [--config train/configs/imagenet_vgg16.py] [--devices 8] [--batch 32]
    python train/memory_report.py --devices 64 --mesh 8x8 --lower tpu,cuda [--set model_overrides.width=0.5]

``--mesh DATAxMODEL`` reports that mesh without and with FSDP instead of the four standard
layouts; ``--lower`` also exports the training step of the last layout for those platforms
(``jax.export``: lowering only) and lists its custom calls (exit 1 if one is CPU-only).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: write DATAxMODEL, e.g. 8x8") from None
    return data, model


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: write KEY=VALUE, e.g. "
                                         "model_overrides.width=0.5")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string ("xla", "bfloat16")


def _apply(config, settings) -> None:
    for key, value in settings:
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "imagenet_vgg16.py"))
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices to lay out over")
    parser.add_argument("--batch", type=int, default=0,
                        help="also compile a training step at this global batch size")
    parser.add_argument("--mesh", type=_mesh, default=None,
                        help="DATAxMODEL: report this mesh (without and with FSDP) only")
    parser.add_argument("--lower", default="",
                        help="comma-separated platforms (tpu,cuda) to export the step for")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a config value, as --config.KEY=VALUE sets it in train.py")
    parser.add_argument("--num_classes", type=int, default=1000)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from train import trainer
    from train.validation import check_model
    n = args.devices
    if args.mesh:
        data, model = args.mesh
        if data * model > n:
            parser.error(f"--mesh {data}x{model} needs {data * model} devices; pass "
                         f"--devices {data * model}")
        layouts = [("rules" if model > 1 else "replicated", dict(data=data, model=model, fsdp=False)),
                   ("rules + FSDP" if model > 1 else "FSDP", dict(data=data, model=model, fsdp=True))]
    else:
        layouts = [("replicated", dict(data=n, model=1, fsdp=False)),
                   ("FSDP", dict(data=n, model=1, fsdp=True)),
                   ("fc6/fc7 tensor-parallel (model=2)", dict(data=n // 2, model=2, fsdp=False)),
                   ("FSDP + tensor-parallel (model=2)", dict(data=n // 2, model=2, fsdp=True))]
    try:
        c = trainer.load_config(args.config)
        _apply(c, args.set)
        check_model(c)
    except (trainer.ConfigError, KeyError, AttributeError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = f"{'layout':38s} {'mesh':>9s} {'per device MiB':>15s} {'total state MiB':>16s}"
    if args.batch:
        head += f" {'step temp MiB':>14s} {'collectives MiB/step':>21s}"
    print(head)
    for name, lay in layouts:
        c.mesh.data, c.mesh.model = lay["data"], lay["model"]
        c.sharding.fsdp = lay["fsdp"]
        m = trainer.state_memory(c, args.num_classes)
        line = (f"{name:38s} {lay['data']:>4d}x{lay['model']:<4d} "
                f"{m['per_device_output_bytes'] / 2**20:15.1f} {m['state_bytes_total'] / 2**20:16.1f}")
        if args.batch:
            s = trainer.step_memory(c, args.batch, args.num_classes)
            comm = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in s["collectives"].items() if v)
            line += f" {s['temp_bytes'] / 2**20:14.1f} {sum(s['collectives'].values()) / 2**20:8.1f} ({comm})"
        print(line, f"[{m['per_device_output_bytes']} bytes]")
    print(f"({c.model}, {c.optimizer.name} momentum={c.optimizer.momentum}, fp32 state; "
          "per device = XLA memory_analysis().output_size_in_bytes of jit(init, out_shardings); "
          "step temp = temp_size_in_bytes of the compiled training step at --batch)")
    bad = False
    for platform in filter(None, args.lower.split(",")):
        batch = args.batch or 2 * c.mesh.data
        exported = trainer.export_step(c, batch, (platform,), args.num_classes)
        text = exported.mlir_module()
        calls = trainer.custom_calls(text)
        cpu = trainer.cpu_only_calls(calls)
        bad |= bool(cpu)
        print(f"training step lowered for {platform}: {exported.nr_devices} devices "
              f"({c.mesh.data}x{c.mesh.model}, fsdp={c.sharding.fsdp}), batch {batch}, "
              f"{text.count('stablehlo.convolution')} convolutions, custom calls: "
              f"{', '.join(sorted(calls)) or 'none'}; CPU-only: {', '.join(sorted(cpu)) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
