"""The scripts as the README runs them: ``python train/eval.py ...`` from the repo root, in a
subprocess, and every script's directory checked for modules that shadow the repo's packages
(run as a script, a file's directory is ``sys.path[0]``: ``train/train.py`` then answers
``from train import folder``). Budget: ~10 s (one eval.py run on a 1/8-width VGG-11, one
process executing the exposed scripts' module bodies).
"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import vgg_flax

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for d in ("train", "convert", "benchmarks")
                 for p in (ROOT / d).glob("*.py") if "__main__" in p.read_text())
# What the scripts import that a file beside them could stand in for.
PACKAGES = ("train", "vgg_flax", "convert", "benchmarks", "jax", "flax", "numpy", "torch",
            "lpips")


def _user_env(**kw):
    """The environment of a user's shell: no PYTHONPATH pointing into the repo."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "JAX_PLATFORMS": "cpu", **kw}


def test_readme_eval_command_runs_as_a_script(tmp_path):
    """README: ``python train/eval.py --weights EXPORT --dataset folder --data-dir photos
    --protocol single``, from the repo root (it failed with ImportError: cannot import name
    'folder' from 'train' (train/train.py))."""
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    for split, n in (("train", 1), ("val", 2)):
        for c in classes:
            (tmp_path / "photos" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(
                    tmp_path / "photos" / split / c / f"{i}.png")
    module = vgg_flax.create("vgg11", num_classes=3, width=0.125, hidden_size=16,
                             pool_size=(1, 1))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                             dict(shapes))
    export = vgg_flax.save(tmp_path / "export", variables, "vgg11", module=module)
    run = subprocess.run(
        [sys.executable, "train/eval.py", "--weights", str(export), "--dataset", "folder",
         "--data-dir", str(tmp_path / "photos"), "--protocol", "single",
         "--resize-size", "36", "--crop-size", "32", "--batch-size", "8", "--threads", "1"],
        cwd=ROOT, env=_user_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "folder:val: 6 images" in run.stdout, run.stdout
    assert "| single | - | 36/32 crop | 6 |" in run.stdout, run.stdout


_SHADOWS = r"""
import importlib.util, json, runpy, sys
from pathlib import Path
root, PACKAGES, scripts = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
clean_path, bad = list(sys.path[1:]), {}
for script in scripts:
    here = (root / script).parent
    sys.path[:] = [str(here)] + clean_path      # what `python SCRIPT` starts with
    for name in [m for m in sys.modules if m.split(".")[0] in ("train", "convert", "benchmarks")]:
        del sys.modules[name]
    runpy.run_path(str(root / script), run_name="_script_body")  # the body, not __main__
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin == str(here / f"{package}.py"):
            bad[script] = f"{package} -> {spec.origin}"
print("SHADOWED " + json.dumps(bad))
"""


def test_no_script_directory_shadows_a_package():
    """Each script beside a file named like a package it imports (train/train.py), its module
    body run with its own directory first on sys.path as ``python SCRIPT`` does, leaves
    ``train``, ``vgg_flax``, ... resolving to the packages, not to that file."""
    assert "train/eval.py" in SCRIPTS and "benchmarks/bench.py" in SCRIPTS
    exposed = [s for s in SCRIPTS if any((ROOT / s).with_name(f"{p}.py").exists()
                                         for p in PACKAGES)]
    assert "train/eval.py" in exposed, exposed
    run = subprocess.run([sys.executable, "-c", _SHADOWS, str(ROOT), ",".join(PACKAGES),
                          *exposed], cwd=ROOT, env=_user_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("SHADOWED "))
    assert line == "SHADOWED {}", line
