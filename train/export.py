"""Export a training run's variables for ``vgg_flax.load`` and ``convert/flax_to_torch.py``:

    python train/export.py --workdir DIR --out OUT [--step N] [--force]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable, not train/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))


def main(argv=None) -> int:
    from vgg_flax import cli
    parser = cli.ArgumentParser(prog="train/export.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="directory of a train/train.py run")
    parser.add_argument("--out", required=True, help="output directory (vgg_flax.save format)")
    parser.add_argument("--step", type=cli.non_negative_int, default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    from train import trainer
    import vgg_flax
    try:
        out = trainer.export(args.workdir, args.out, step=args.step, force=args.force)
    except (trainer.ConfigError, vgg_flax.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out exists, lies under a regular file, or is not writable
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    module, variables = vgg_flax.load(out)
    info = vgg_flax.checkpoint.read_info(out)
    n = sum(x.size for x in __import__("jax").tree.leaves(variables["params"]))
    print(f"exported {info['name']} step {info['trained']['step']} ({n:,} parameters, "
          f"{module.num_classes} classes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
