"""torch is never imported at JAX run time: a process where ``import torch`` (and torchvision)
fails loads a saved checkpoint, runs the forward pass and the ``classify`` CLI, and ends with no
torch module loaded; the trainer's metric writer does not import torch even where it could.
(torch is only needed to convert weights.)"""
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

_RUN = r"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is blocked in this process (imported: {name})")
        return None

sys.meta_path.insert(0, NoTorch())
import numpy as np
import vgg_flax
from vgg_flax import classify
module, variables = vgg_flax.load(sys.argv[1])
logits = module.apply(variables, np.zeros((1, 32, 32, 3), np.float32))
assert logits.shape == (1, 10), logits.shape
assert classify.main([sys.argv[2], "--weights", sys.argv[1], "--top", "3"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert not loaded, loaded
print("NO TORCH OK")
"""


def test_load_forward_and_classify_without_torch(tmp_path):
    module = vgg_flax.create("vgg11", num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    ckpt = vgg_flax.save(tmp_path / "ckpt", variables, "vgg11", module=module)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run([sys.executable, "-c", _RUN, str(ckpt), str(image)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "NO TORCH OK" in p.stdout and "1. " in p.stdout, p.stdout


_METRICS = r"""
import sys
from pathlib import Path
from train.metrics import MetricWriter
writer = MetricWriter(Path(sys.argv[1]), active=True, resume_step=0)
writer.write(1, {"loss": 2.5})
writer.close()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert not loaded, loaded[:5]
print("NO TORCH OK")
"""


def test_trainer_metrics_do_not_import_torch(tmp_path):
    """The trainer's TensorBoard writer (tensorboardX imports torch whenever it is installed,
    0.7 GB and 1.7 s here) leaves torch out, with torch installed and importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _METRICS, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "NO TORCH OK" in p.stdout, p.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 2.5}'
    assert list(tmp_path.glob("events.out.tfevents.*"))
