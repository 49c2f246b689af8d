"""Pod readiness on paper (issue 24): the trainer's sharded training step (train/steps.py, the
rules of train/sharding.py, FSDP on) lowered for TPU and for CUDA over a 64-device mesh holds no
CPU-only custom call, and train/memory_report.py reports per-device bytes for that mesh, on 64
fake CPU devices. A tiny VGG-16: lowering and one compiled init only.
Budget: ~20 s on 2 shared cores (one subprocess; the in-process control lowers on 1 device)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
from jax.sharding import AbstractMesh

from train import input_pipeline, sharding, trainer
from train.state import Setup

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_overrides.width": 0.125, "model_overrides.hidden_size": 64,
        "model_overrides.pool_size": (1, 1), "input.crop_size": 32,
        "sharding.fsdp_min_size": 1024}
CLASSES = 10


def tiny(**kw):
    from test_train import set_keys
    return set_keys(trainer.load_config(ROOT / "train/configs/imagenet_vgg16.py"), **TINY, **kw)


def per_device_state_bytes(config, data, model):
    """What the state's shardings put on one device, from the rules alone (an abstract mesh)."""
    c = trainer.resolved(config)
    mesh = AbstractMesh((data, model), sharding.AXES)
    setup = Setup(c, input_pipeline.DatasetInfo(CLASSES, 3, 0, 0), mesh)
    leaves = jax.tree.leaves(setup.abstract_sharded)
    return sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
               for s in leaves), len(leaves)


def test_step_lowered_for_tpu_and_cuda_on_64_devices_and_its_memory():
    args = [f"--set={k}={v}" for k, v in TINY.items()]
    p = subprocess.run([sys.executable, str(ROOT / "train/memory_report.py"),
                        "--config", str(ROOT / "train/configs/imagenet_vgg16.py"), "--devices",
                        "64", "--mesh", "8x8", "--lower", "tpu,cuda", "--num_classes",
                        str(CLASSES), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    out = p.stdout
    for platform in ("tpu", "cuda"):
        line = next(l for l in out.splitlines() if l.startswith(f"training step lowered for "
                                                                 f"{platform}:"))
        assert "64 devices (8x8, fsdp=True)" in line and line.endswith("CPU-only: none"), line
        # XLA's convolutions: 13 forward, 12 backward-data (none into the image), 13 weights
        assert int(re.search(r"(\d+) convolutions", line).group(1)) == 13 + 12 + 13, line
    # per device: XLA's memory analysis of the compiled init is the bytes the rules assign,
    # plus the output tuple's table (one 8-byte pointer per leaf, on XLA:CPU)
    got = {name: int(b) for name, b in re.findall(r"^(rules(?: \+ FSDP)?)\s.*\[(\d+) bytes\]",
                                                     out, re.M)}
    want = {"rules": per_device_state_bytes(tiny(), 8, 8),
            "rules + FSDP": per_device_state_bytes(tiny(**{"sharding.fsdp": True}), 8, 8)}
    assert set(got) == set(want), out
    for name, (size, leaves) in want.items():
        assert 0 <= got[name] - size <= 8 * leaves, (name, got[name], size)
    assert want["rules + FSDP"][0] < want["rules"][0] / 4


def test_the_check_finds_a_cpu_custom_call():
    """The same step lowered for this CPU (one device) holds the oneDNN convolutions: the
    check above would see them."""
    c = trainer.resolved(tiny(**{"mesh.data": 1}))
    from train.memory import _abstract_step
    _, step, args = _abstract_step(c, 2, CLASSES, 3)
    calls = trainer.custom_calls(step.lower(*args).as_text())
    from vgg_flax import onednn
    if onednn.available():
        assert {"vgg_flax_conv_bias_fwd", "vgg_flax_conv_bwd_data"} <= trainer.cpu_only_calls(calls)
    else:
        assert not trainer.cpu_only_calls(calls)
