"""The torch <-> Flax converter, as a user runs it (subprocess) and from Python.

Seeded random torchvision weights saved to temp files; no network. References are torchvision
itself (its vgg builders, ``SSDFeatureExtractorVGG``, ``ssd300_vgg16``) or torch modules built
here the way ssd.pytorch builds them. Budget: about 3 minutes on 2 cores; full-size VGG-16 is
converted once (round trip), everything else uses small models.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import vgg_flax
from vgg_flax import convert as C
from vgg_flax.convert import cli as CLI, formats as F, mapping as M, verify as V

ROOT = Path(__file__).resolve().parents[1]
T2F = [sys.executable, str(ROOT / "convert" / "torch_to_flax.py")]
F2T = [sys.executable, str(ROOT / "convert" / "flax_to_torch.py")]
# The small shape of most tests: a quarter-width VGG with a 10-class head (a CIFAR-style fine-tune).
SMALL = dict(num_classes=10, width=0.25, hidden_size=64, pool_size=(1, 1))
SMALL_FLAGS = ["--num-classes", "10", "--set", "width=0.25", "--set", "hidden_size=64",
               "--set", "pool_size=1,1", "--verify-batch", "2"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    return env


def run(cmd, *args, check=None, **env):
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                       env=_env(**env), timeout=600)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(main, *args, check=None) -> Result:
    """The CLI's own entry point (argument parsing included) in this process: the same code a
    subprocess runs, without paying torch+jax imports again (the budget allows few subprocesses)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    r = Result(rc, out.getvalue(), err.getvalue())
    if check is not None:
        assert rc == check, (rc, r.stdout, r.stderr)
    return r


def seeded_state_dict(name: str, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """Seeded random weights of torch's reference module for VGG ``name`` (BN stats random too)."""
    module = vgg_flax.create(name, **overrides)
    torch.manual_seed(seed)
    model = V.torch_reference(name, module).to_empty(device="cpu")  # every value is drawn below
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.zero_()
        if module.head == "ssd":
            model.scale_weight.uniform_(5, 25)
    sd = model.state_dict()
    if module.head == "ssd":
        sd = {k: v for k, v in sd.items() if not k.startswith(("extra.1", "extra.2", "extra.3", "extra.4"))}
    return {k: v.clone() for k, v in sd.items()}


def assert_tree_equal(a, b):
    fa, fb = dict(F.flatten(a)), dict(F.flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=k)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def one_error_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def small(tmp) -> tuple[Path, dict]:
    sd = seeded_state_dict("vgg11", **SMALL)
    path = tmp / "vgg11_small.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="session")
def vgg16_full(tmp) -> tuple[Path, dict]:
    """Full-size seeded torchvision vgg16 (the only full-size classifier file)."""
    torch.manual_seed(0)
    sd = torchvision.models.vgg16().state_dict()
    path = tmp / "vgg16_full.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="session")
def ssd_sd(tmp) -> tuple[Path, dict]:
    sd = seeded_state_dict("vgg16_ssd")
    path = tmp / "ssd_extractor.pth"
    torch.save(sd, path)
    return path, sd


def _shape_only(sd_shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Tensors with the right shapes and a 4-byte storage (stride 0): tiny files for tests that
    fail on shapes before any value is read."""
    return {k: torch.zeros(()).expand(s) for k, s in sd_shapes.items()}


def _tv_shapes(builder, **kw) -> dict[str, tuple]:
    with torch.device("meta"):
        m = getattr(torchvision.models, builder)(**kw)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()
            if not k.endswith("num_batches_tracked")}


# -- every name, through the real CLI -----------------------------------------------------------
def test_every_name_through_the_cli(tmp, ssd_sd):
    """Each name: seeded weights in a file -> the CLI (verification on) -> vgg_flax.load equals
    vgg_flax.from_torch of the same weights, bit for bit."""
    for name in vgg_flax.list_models():
        if name == "vgg16_ssd":
            (path, sd), flags, overrides = ssd_sd, ["--verify-batch", "1"], {}
        else:
            sd = seeded_state_dict(name, seed=1, **SMALL)
            path = tmp / f"every_{name}.pth"
            torch.save(sd, path)
            flags, overrides = SMALL_FLAGS, SMALL
        out = tmp / "every_out" / name
        p = cli(CLI.torch_to_flax_main, name, "--weights", path, "--out", out, *flags, check=0)
        assert "verify:" in p.stdout and ": OK" in p.stdout, p.stdout
        module, variables = vgg_flax.load(out)
        assert_tree_equal(variables, vgg_flax.from_torch(sd, name, **overrides))
        if name != "vgg16_ssd":
            assert module.num_classes == 10


# -- layouts, through the Python API ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["state_dict", "checkpoint_state_dict", "checkpoint_model",
                                    "dataparallel", "safetensors", "legacy_pickle"])
def test_layouts(tmp, small, layout):
    _, sd = small
    path = tmp / f"layout_{layout}.pth"
    if layout == "state_dict":
        torch.save(sd, path)
    elif layout == "checkpoint_state_dict":
        torch.save({"epoch": 7, "state_dict": sd, "optimizer": {"lr": 0.1}}, path)
    elif layout == "checkpoint_model":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "step": 3}, path)
    elif layout == "dataparallel":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    module, variables = M.load_torch_weights("vgg11", path, progress=False,
                                             num_classes=10, overrides={k: v for k, v in SMALL.items() if k != "num_classes"})
    assert module.num_classes == 10
    assert_tree_equal(variables, vgg_flax.from_torch(sd, "vgg11", **SMALL))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_weights(tmp, small, half):
    """fp16/bf16 files: widened to float32 by default (exact), or kept with --dtype keep."""
    _, sd = small
    hsd = {k: v.to(getattr(torch, half)) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp / f"half_{half}.pth"
    torch.save(hsd, path)
    over = {k: v for k, v in SMALL.items() if k != "num_classes"}
    _, v32 = M.load_torch_weights("vgg11", path, progress=False, num_classes=10, overrides=over)
    expect = vgg_flax.from_torch({k: v.float() for k, v in hsd.items()}, "vgg11", **SMALL)
    assert_tree_equal(v32, expect)
    module, kept = M.load_torch_weights("vgg11", path, progress=False, num_classes=10,
                                        overrides=over, dtype="keep")
    import jax.numpy as jnp
    assert kept["params"]["fc8"]["kernel"].dtype.name == half
    assert jnp.dtype(module.param_dtype).name == half
    # BatchNorm statistics stay float32 whatever the parameter dtype.
    bn = {k: v.to(getattr(torch, half)) if v.is_floating_point() else v
          for k, v in seeded_state_dict("vgg11_bn", **SMALL).items()}
    torch.save(bn, tmp / f"half_bn_{half}.pth")
    _, kept_bn = M.load_torch_weights("vgg11_bn", tmp / f"half_bn_{half}.pth", progress=False,
                                      num_classes=10, overrides=over, dtype="keep")
    assert kept_bn["params"]["bn1_1"]["scale"].dtype.name == half
    assert kept_bn["batch_stats"]["bn1_1"]["var"].dtype.name == "float32"
    np.testing.assert_array_equal(kept_bn["batch_stats"]["bn1_1"]["var"],
                                  bn["features.1.running_var"].float().numpy())
    np.testing.assert_array_equal(kept["params"]["fc8"]["kernel"].astype(np.float32),
                                  expect["params"]["fc8"]["kernel"])
    # And through the CLI with verification: torchvision's model on the same (widened) weights.
    out = tmp / f"half_{half}_out"
    p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", path, "--out", out, "--dtype", "keep",
            *SMALL_FLAGS, check=0)
    assert "OK" in p.stdout and f"{half} -> {half}" in p.stderr
    m2, v2 = vgg_flax.load(out)  # the module is rebuilt from vgg_flax.json
    assert v2["params"]["conv1_1"]["kernel"].dtype.name == half
    assert jnp.dtype(m2.param_dtype).name == half


# -- SSD layouts --------------------------------------------------------------------------------
def ssd_pytorch_base() -> nn.ModuleList:
    """ssd.pytorch's ``vgg(base['300'], 3)`` (amdegroot/ssd.pytorch ssd.py), rebuilt here."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        elif v == "C":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)]
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = v
    pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
    conv7 = nn.Conv2d(1024, 1024, kernel_size=1)
    layers += [pool5, conv6, nn.ReLU(inplace=True), conv7, nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


def _flax_ssd(variables, x_nchw):
    import jax
    module = vgg_flax.create("vgg16_ssd", taps=("relu4_3", "conv4_3_norm", "relu7"))
    with jax.default_matmul_precision("highest"):
        y = module.apply(variables, x_nchw.numpy().transpose(0, 2, 3, 1))
    return {k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in y.items()}


def _close(a, b, rtol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= rtol * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


def test_ssd_pytorch_reducedfc_layout(tmp):
    """``vgg16_reducedfc.pth`` keys 0..33: relu4_3 and relu7 equal ssd.pytorch's own forward."""
    torch.manual_seed(3)
    base = ssd_pytorch_base().eval()
    sd = base.state_dict()
    assert sorted({int(k.split(".")[0]) for k in sd}) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21,
                                                           24, 26, 28, 31, 33]
    path = tmp / "vgg16_reducedfc.pth"
    torch.save(sd, path)
    _, variables = M.load_torch_weights("vgg16_ssd", path, progress=False)
    np.testing.assert_array_equal(variables["params"]["conv4_3_norm"]["scale"], 20.0)
    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x
        for i, layer in enumerate(base):
            h = layer(h)
            if i == 22:
                relu4_3 = h.clone()
    got = _flax_ssd(variables, x)
    _close(got["relu4_3"], relu4_3)
    _close(got["relu7"], h)
    assert got["relu7"].shape == (1, 1024, 19, 19)


def test_torchvision_ssd300_layout(tmp):
    """torchvision's ssd300_vgg16 state_dict: heads and extra.1-4 dropped (with a note); the
    backbone's outputs "0" (L2Norm'd conv4_3) and "1" (relu7) are reproduced."""
    from torchvision.models.detection import ssd300_vgg16
    torch.manual_seed(4)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=5).eval()
    with torch.no_grad():
        model.backbone.scale_weight.uniform_(5, 25)
    path = tmp / "ssd300.pth"
    torch.save(model.state_dict(), path)
    prep = M.prepare("vgg16_ssd", path, progress=False)
    assert any("detection heads" in n for n in prep.notes)
    assert any("extra.1-4" in n for n in prep.notes)
    variables = M.map_to_flax(prep.tensors, prep.module, prep.dtype, progress=False)
    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.backbone(x)
    got = _flax_ssd(variables, x)
    _close(got["conv4_3_norm"], ref["0"])
    _close(got["relu7"], ref["1"])


def test_ssd_pytorch_full_model_layout(tmp, ssd_sd):
    """ssd.pytorch's whole SSD (``vgg.N``, ``L2Norm.weight``, extras/loc/conf) -> the backbone."""
    _, sd = ssd_sd
    base = ssd_pytorch_base()
    names = [k for k in base.state_dict()]  # 0.weight ... 33.bias, in order
    mine = [k for k in sd if k != "scale_weight"]
    assert len(names) == len(mine)
    full = {f"vgg.{n}": sd[m] for n, m in zip(names, mine)}
    full["L2Norm.weight"] = sd["scale_weight"]
    full["extras.0.weight"] = torch.zeros(256, 1024, 1, 1)
    full["loc.0.weight"] = torch.zeros(16, 512, 3, 3)
    full["conf.0.weight"] = torch.zeros(84, 512, 3, 3)
    path = tmp / "ssd_pytorch_full.pth"
    torch.save({"module." + k: v for k, v in full.items()}, path)
    _, variables = M.load_torch_weights("vgg16_ssd", path, progress=False)
    assert_tree_equal(variables, vgg_flax.from_torch(sd, "vgg16_ssd"))


def test_ssd_from_classifier_decimation(vgg16_full):
    """--ssd-from-classifier against an independent numpy computation of SSD's reduced fc."""
    path, sd = vgg16_full
    prep = M.prepare("vgg16_ssd", path, ssd_from_classifier=True, progress=False)
    variables = M.map_to_flax(prep.tensors, prep.module, prep.dtype, progress=False)
    fc6 = sd["classifier.0.weight"].numpy().reshape(4096, 512, 7, 7)
    keep, pos = np.arange(0, 4096, 4), np.array([0, 3, 6])
    conv6 = fc6[keep][:, :, pos][:, :, :, pos]                        # (1024, 512, 3, 3)
    conv7 = sd["classifier.3.weight"].numpy()[keep][:, keep]          # (1024, 1024)
    p = variables["params"]
    np.testing.assert_array_equal(p["conv6"]["kernel"], conv6.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["conv6"]["bias"], sd["classifier.0.bias"].numpy()[keep])
    np.testing.assert_array_equal(p["conv7"]["kernel"][0, 0], conv7.T)
    np.testing.assert_array_equal(p["conv7"]["bias"], sd["classifier.3.bias"].numpy()[keep])
    np.testing.assert_array_equal(p["conv5_1"]["kernel"],
                                  sd["features.24.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["conv4_3_norm"]["scale"], 20.0)
    # The public pure function agrees.
    c6, b6, c7, b7 = C.decimate_fc(sd["classifier.0.weight"].numpy(), sd["classifier.0.bias"].numpy(),
                                   sd["classifier.3.weight"].numpy(), sd["classifier.3.bias"].numpy())
    np.testing.assert_array_equal(c6, conv6)
    np.testing.assert_array_equal(c7[:, :, 0, 0], conv7)


def torch_home_with(home, filename, path):
    """A TORCH_HOME whose hub cache holds ``path`` under torchvision's file name for a weights enum."""
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / filename).symlink_to(path)
    return home


# -- full-size vgg16: default weights from torchvision's cache, round trip -----------------------
def test_vgg16_default_weights_round_trip(tmp, vgg16_full):
    """``torch_to_flax.py vgg16`` with torchvision's IMAGENET1K_V1 found in the hub cache (our
    seeded file under its name), verified on a seeded batch and an image; then back to torch:
    torchvision's vgg16 loads it with strict=True and every tensor is bit-identical."""
    from PIL import Image
    path, sd = vgg16_full
    home = torch_home_with(tmp / "torch_home", "vgg16-397923af.pth", path)
    img = tmp / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(img)
    out = tmp / "rt" / "vgg16"
    p = run(T2F, "vgg16", "--out", out, "--image", img, "--verify-batch", "1", check=0,
            TORCH_HOME=str(home))
    assert "VGG16_Weights.IMAGENET1K_V1" in p.stdout
    assert "138,357,544 parameters" in p.stdout
    assert "verify: 2 inputs 224x224" in p.stdout and "top-5 agree 2/2: OK" in p.stdout
    assert "peak RSS" in p.stdout
    back = tmp / "rt" / "vgg16_back.pth"
    run(F2T, out, "--out", back, "--no-verify", check=0)
    rt = torch.load(back, weights_only=True)
    assert list(rt) == list(sd)
    for k in sd:
        assert rt[k].dtype == sd[k].dtype and torch.equal(rt[k], sd[k]), k
    with torch.device("meta"):  # keys and shapes only
        torchvision.models.vgg16().load_state_dict(rt, strict=True, assign=True)


def test_ssd_default_features_weights(tmp, vgg16_full):
    """vgg16_ssd's default is torchvision's IMAGENET1K_FEATURES (a vgg16 file whose classifier
    is not valid): features taken, conv6/conv7 initialised as ssd300_vgg16 does, with notes."""
    path, sd = vgg16_full
    # A vgg16 file under the features weights' name; its classifier is ignored, as torchvision's
    # is not valid in the real file.
    home = torch_home_with(tmp / "torch_home_ssd", "vgg16_features-amdegroot-88682ab5.pth", path)
    out = tmp / "ssd_default"
    p = run(T2F, "vgg16_ssd", "--out", out, "--verify-batch", "1", check=0, TORCH_HOME=str(home))
    assert "IMAGENET1K_FEATURES" in p.stdout and "Xavier" in p.stderr and "OK" in p.stdout
    _, v = vgg_flax.load(out)
    np.testing.assert_array_equal(v["params"]["conv5_3"]["kernel"],
                                  sd["features.28.weight"].numpy().transpose(2, 3, 1, 0))
    assert np.isfinite(v["params"]["conv6"]["kernel"]).all()
    bound = np.sqrt(6 / (512 * 9 + 1024 * 9))
    assert np.abs(v["params"]["conv6"]["kernel"]).max() <= bound
    # flax -> torch for the SSD backbone: torchvision's SSDFeatureExtractorVGG layout.
    back = tmp / "ssd_back.safetensors"
    cli(CLI.flax_to_torch_main, out, "--out", back, "--verify-batch", "1", check=0)
    from safetensors.torch import load_file
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
    with torch.device("meta"):  # keys and shapes only
        ext = SSDFeatureExtractorVGG(torchvision.models.vgg16().features, highres=False)
    res = ext.load_state_dict(load_file(back), strict=False, assign=True)
    assert not res.unexpected_keys
    assert {k.split(".")[1] for k in res.missing_keys} == {"1", "2", "3", "4"}


def test_offline_without_cache(tmp):
    """No network and nothing cached: exit 2, one line naming the cache path and --weights."""
    home = tmp / "empty_torch_home"
    out = tmp / "offline_out"
    p = run(T2F, "vgg11", "--out", out, TORCH_HOME=str(home), https_proxy="http://127.0.0.1:9",
            HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    line = one_error_line(p)
    assert p.returncode == 2
    assert str(home / "hub" / "checkpoints" / "vgg11-8a719046.pth") in line and "--weights PATH" in line
    assert not out.exists()


# -- output formats, --force, flax_to_torch -----------------------------------------------------
def test_formats_and_back(tmp, small):
    """safetensors and msgpack outputs read by their own libraries; each converts back to torch
    (verified) and torchvision's VGG class loads it strictly; the round trip is bit-exact."""
    from flax import serialization
    from safetensors.numpy import load_file
    path, sd = small
    expect = vgg_flax.from_torch(sd, "vgg11", **SMALL)
    st = tmp / "fmt" / "v.safetensors"
    p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", path, "--out", st, *SMALL_FLAGS, check=0)
    assert "file read back bit-identical: OK" in p.stdout
    assert_tree_equal(F.unflatten(load_file(st)), expect)
    mp = tmp / "fmt" / "v.msgpack"
    cli(CLI.torch_to_flax_main, "vgg11", "--weights", path, "--out", mp, "--no-verify", *SMALL_FLAGS,
        check=0)
    assert_tree_equal(serialization.msgpack_restore(mp.read_bytes()), expect)
    for src, extra in ((st, []), (mp, ["--name", "vgg11"] + SMALL_FLAGS[:-2])):
        back = tmp / "fmt" / f"back_{src.suffix[1:]}.pth"
        p = cli(CLI.flax_to_torch_main, src, "--out", back, "--verify-batch", "1", *extra, check=0)
        assert "OK" in p.stdout
        rt = torch.load(back, weights_only=True)
        assert list(rt) == list(sd)
        assert all(torch.equal(rt[k], sd[k]) for k in sd)
        module = vgg_flax.create("vgg11", **SMALL)
        V.torch_reference("vgg11", module).to_empty(device="cpu").load_state_dict(rt, strict=True)


def test_force_and_existing_output(tmp, small):
    path, _ = small
    out = tmp / "force" / "v"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    argv = ["vgg11", "--weights", str(path), "--out", str(out), "--no-verify", *SMALL_FLAGS]
    p = cli(CLI.torch_to_flax_main, *argv)
    assert p.returncode == 2 and "--force" in one_error_line(p)
    assert (out / "keep.txt").read_text() == "mine"
    cli(CLI.torch_to_flax_main, *argv, "--force", check=0)
    assert not (out / "keep.txt").exists() and (out / "vgg_flax.json").exists()
    assert leftovers(out.parent) == []


def test_python_api_torch_to_flax(tmp, small):
    path, sd = small
    s = C.torch_to_flax("vgg11", path, tmp / "api" / "v", progress=False, num_classes=10,
                        overrides={"width": 0.25, "hidden_size": 64, "pool_size": (1, 1)},
                        verify_batch=1)
    assert s.verification.ok and s.verification.max_rel < 1e-4 and s.num_params > 0
    assert s.peak_rss > 0 and s.out_bytes > 0
    _, v = vgg_flax.load(s.out)
    assert_tree_equal(v, vgg_flax.from_torch(sd, "vgg11", **SMALL))


# -- bad input: exit 2, one line, nothing left behind -------------------------------------------
def _bad(tmp, tag, *args, expect, in_process=True):
    out_dir = tmp / f"bad_{tag}"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "out"
    if in_process:
        p = cli(CLI.torch_to_flax_main, *args, "--out", out)
    else:
        p = run(T2F, *args, "--out", out)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p)
    for e in expect:
        assert e in line, line
    assert list(out_dir.iterdir()) == []
    return line


def test_bad_unknown_name(tmp):
    _bad(tmp, "name", "vgg17", expect=["unknown VGG 'vgg17'", "vgg16_bn"], in_process=False)


def test_bad_missing_file(tmp):
    _bad(tmp, "missing", "vgg11", "--weights", tmp / "nope.pth", expect=["no such file"])


def test_bad_empty_file(tmp):
    (tmp / "empty.pth").write_bytes(b"")
    _bad(tmp, "empty", "vgg11", "--weights", tmp / "empty.pth", expect=["is empty"])


def test_bad_truncated_files(tmp, small):
    path, sd = small
    data = path.read_bytes()
    (tmp / "trunc.pth").write_bytes(data[: len(data) // 2])
    _bad(tmp, "trunc", "vgg11", "--weights", tmp / "trunc.pth", expect=["truncated"])
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "full.safetensors")
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _bad(tmp, "trunc_st", "vgg11", "--weights", tmp / "trunc.safetensors", expect=["truncated"])


def test_bad_directory(tmp):
    d = tmp / "a_dir"
    d.mkdir()
    _bad(tmp, "dir", "vgg11", "--weights", d, expect=["is a directory"])


@pytest.mark.parametrize("obj", ["list", "tensor", "dict_of_ints"])
def test_bad_not_a_state_dict(tmp, obj):
    value = {"list": [1, 2, 3], "tensor": torch.zeros(3), "dict_of_ints": {"epoch": 3}}[obj]
    f = tmp / f"not_sd_{obj}.pth"
    torch.save(value, f)
    _bad(tmp, f"notsd_{obj}", "vgg11", "--weights", f, expect=["state_dict"])


@pytest.mark.parametrize("given, as_name, expect", [
    ("vgg19", "vgg16", "look like vgg19 weights"),
    ("vgg11_bn", "vgg11", "look like vgg11_bn weights"),
    ("ssd", "vgg16", "convert them as vgg16_ssd"),
    ("vgg16_10", "vgg16", "pass --num-classes 10"),
])
def test_bad_other_variant_or_shape(tmp, given, as_name, expect):
    shapes = {"vgg19": lambda: _tv_shapes("vgg19"), "vgg11_bn": lambda: _tv_shapes("vgg11_bn"),
              "vgg16_10": lambda: _tv_shapes("vgg16", num_classes=10),
              "ssd": lambda: {k: tuple(v.shape) for k, v in seeded_state_dict("vgg16_ssd").items()}}
    f = tmp / f"variant_{given}.pth"
    torch.save(_shape_only(shapes[given]()), f)
    _bad(tmp, f"variant_{given}", as_name, "--weights", f, expect=[expect])


def test_bad_small_head_suggests_all_fields(tmp, small):
    path, _ = small
    _bad(tmp, "suggest", "vgg11", "--weights", path,
         expect=["--num-classes 10", "--set width=0.25", "--set hidden_size=64",
                 "--set pool_size=1,1"])


def test_bad_classifier_as_ssd(tmp, small):
    path, _ = small
    _bad(tmp, "cls_as_ssd", "vgg16_ssd", "--weights", path, expect=["--ssd-from-classifier"])


def test_bad_image(tmp, small):
    path, _ = small
    (tmp / "not_an_image.png").write_text("hello")
    _bad(tmp, "image", "vgg11", "--weights", path, *SMALL_FLAGS, "--image",
         tmp / "not_an_image.png", expect=["cannot read image"])


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: a file appears if the pickle is executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_run(tmp, container):
    marker = tmp / f"pwned_{container}"
    f = tmp / f"evil_{container}.pth"
    if container == "zip":
        torch.save({"features.0.weight": torch.zeros(1), "x": _Payload(str(marker))}, f)
    else:
        f.write_bytes(pickle.dumps({"features.0.weight": _Payload(str(marker))}, protocol=2))
    assert not marker.exists()
    line = _bad(tmp, f"evil_{container}", "vgg11", "--weights", f,
                expect=["refused without running it"], in_process=False)
    assert "open" in line or "builtins" in line
    assert not marker.exists()


def test_keyboard_interrupt_mid_write_leaves_nothing(tmp, vgg16_full):
    path, _ = vgg16_full
    out_dir = tmp / "interrupt"
    out_dir.mkdir()
    cmd = T2F + ["vgg16", "--weights", str(path), "--out", str(out_dir / "v"), "--no-verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(".v.tmp-" in p.name for p in out_dir.iterdir()):  # orbax is writing
            time.sleep(0.2)  # inside the write
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(out_dir.iterdir()) == []


def test_flax_to_torch_bad_input(tmp, small):
    d = tmp / "f2t_bad"
    d.mkdir()
    (d / "plain_dir").mkdir()
    cases = [
        ((d / "missing", "--out", d / "x.pth"), "no such checkpoint"),
        ((d / "plain_dir", "--out", d / "x.pth"), "not a vgg_flax checkpoint"),
        ((d / "plain_dir", "--out", d / "x.npz"), ".pth, .pt or .safetensors"),
    ]
    for args, expect in cases:
        p = cli(CLI.flax_to_torch_main, *args)
        assert p.returncode == 2 and expect in one_error_line(p), p.stderr
    assert sorted(x.name for x in d.iterdir()) == ["plain_dir"]


def test_unknown_torchvision_weights_name(tmp):
    _bad(tmp, "enum", "vgg16", "--weights", "IMAGENET1K_V7", expect=["IMAGENET1K_V1", "IMAGENET1K_FEATURES"])
    _bad(tmp, "noweights", "vgg16_c", expect=["no published torchvision weights", "--weights PATH"])


# -- bad input that would give a traceback (issue 15): one line, exit 2, nothing left ---------
@pytest.fixture(scope="session")
def converted(tmp, small) -> Path:
    """A small orbax checkpoint written by the converter (to damage in copies)."""
    out = tmp / "converted_small"
    cli(CLI.torch_to_flax_main, "vgg11", "--weights", small[0], "--out", out, "--no-verify",
        *SMALL_FLAGS, check=0)
    return out


def _damaged(converted, tmp, tag, damage) -> Path:
    import shutil
    d = tmp / f"damaged_{tag}"
    if not d.exists():
        shutil.copytree(converted, d)
        damage(d)
    return d


def _drop_largest_array_file(d: Path) -> None:
    max((f for f in (d / "variables").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size).unlink()


def _write_info(d: Path, edit) -> None:
    import json
    f = d / "vgg_flax.json"
    info = json.loads(f.read_text())
    edit(info)
    f.write_text(json.dumps(info))


T2F_BAD = [  # (tag, arguments after the name, words the one line must hold)
    ("out_under_a_file", lambda t, s: ["--weights", s, "--out", t / "a_file" / "sub"],
     ["a_file is a file", "--out"]),
    ("negative_classes", lambda t, s: ["--weights", s, "--num-classes", "-5", "--out", t / "o"],
     ["--num-classes -5", "at least 1"]),
    ("zero_classes", lambda t, s: ["--weights", s, "--num-classes", "0", "--out", t / "o"],
     ["--num-classes 0"]),
]


def _with(*flags, out="o"):
    return lambda t, s: ["--weights", s, *flags, "--out", t / out]


# Bad values (issue 26): --set is checked against the VGG's own field rules (fields.FIELDS, as
# create() checks them), numeric flags are range-checked, --format must agree with --out.
T2F_BAD += [
    ("set_conv", _with("--set", "conv=cuda"),
     ["--set conv=cuda: conv (convolution implementation) must be 'auto', 'onednn' or 'xla', got 'cuda'"]),
    ("set_width_text", _with("--set", "width=abc"),
     ["--set width=abc: width (channel multiplier) must be a finite number > 0, got 'abc'"]),
    ("set_pool_int", _with("--set", "pool_size=1"),
     ["--set pool_size=1", "two positive integers", "got 1", "--set pool_size=7,7"]),
    ("set_hidden_float", _with("--set", "hidden_size=64.5"), ["a positive integer, got 64.5"]),
    ("set_dtype_int8", _with("--set", "dtype=int8"), ["float32, bfloat16 or float16, got 'int8'"]),
    ("set_dropout_nan", _with("--set", "dropout_rate=nan"), ["dropout_rate", "[0, 1), got nan"]),
    ("set_taps", _with("--set", "taps=relu1_1"),
     ["--set taps=relu1_1: taps is not a property of the weights", "vgg_flax.load(path, taps=...)"]),
    ("set_taps_tuple", _with("--set", "taps=relu1_1,relu2_1"), ["not a property of the weights"]),
    ("set_unknown", _with("--set", "colour=1"), ["--set colour=1: unknown VGG field 'colour'"]),
    ("verify_batch_zero", _with("--verify-batch", "0"),
     ["--verify-batch 0 and no --image leave nothing to verify on", "--no-verify"]),
    ("verify_batch_negative", _with("--verify-batch", "-1"), ["--verify-batch -1: must be an integer >= 0"]),
    ("rtol_nan", _with("--rtol", "nan"), ["--rtol nan: the tolerance", "a finite number >= 0"]),
    ("rtol_negative", _with("--rtol", "-1"), ["--rtol -1.0: the tolerance"]),
    ("rtol_inf", _with("--rtol", "inf"), ["--rtol inf: the tolerance"]),
    ("seed_negative", _with("--seed", "-1"), ["--seed -1: must be an integer in [0, 2**63)"]),
    ("msgpack_as_safetensors", _with("--format", "msgpack", out="x.safetensors"),
     ["--format msgpack does not match --out", "x.safetensors", "a .msgpack file name"]),
    ("safetensors_no_suffix", _with("--format", "safetensors"), ["a .safetensors file name"]),
    ("orbax_as_msgpack", _with("--format", "orbax", out="x.msgpack"), ["a directory name"]),
]


@pytest.mark.parametrize("tag, args, expect", T2F_BAD, ids=[c[0] for c in T2F_BAD])
def test_torch_to_flax_bad_input_table(tmp, small, tag, args, expect):
    d = tmp / f"t2f_bad_{tag}"
    d.mkdir()
    (d / "a_file").write_text("x")
    p = cli(CLI.torch_to_flax_main, "vgg11", *args(d, small[0]))
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = one_error_line(p)
    for e in expect:
        assert e in line, line
    assert sorted(x.name for x in d.iterdir()) == ["a_file"]


def test_nan_weights_are_named(tmp, small, converted_msgpack):
    """NaN weights are not reported as "outputs differ beyond the tolerance" (nor, unverified,
    written): one line naming the tensors, both ways, nothing written."""
    from flax import serialization
    sd = {k: v.clone() for k, v in small[1].items()}
    sd["features.3.weight"][0, 0, 0, :2] = float("nan")
    sd["classifier.6.bias"][0] = float("inf")
    d = tmp / "nan_weights"
    d.mkdir()
    torch.save(sd, d / "nan.pth")
    for extra in ([], ["--no-verify"]):
        p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", d / "nan.pth", *SMALL_FLAGS, *extra,
                "--out", d / "o")
        line = one_error_line(p)
        assert p.returncode == 2 and "holds NaN or inf values in features.3.weight (2), " \
            "classifier.6.bias (1)" in line and "nothing written" in line, line
    variables = serialization.msgpack_restore(converted_msgpack.read_bytes())
    bias = variables["params"]["conv1_1"]["bias"] = variables["params"]["conv1_1"]["bias"].copy()
    bias[3] = float("nan")
    (d / "nan.msgpack").write_bytes(serialization.msgpack_serialize(variables))
    p = cli(CLI.flax_to_torch_main, d / "nan.msgpack", "--name", "vgg11", *SMALL_FLAGS[:-2],
            "--out", d / "back.pth")
    assert p.returncode == 2 and "NaN or inf values in params/conv1_1/bias (1)" in one_error_line(p)
    assert sorted(x.name for x in d.iterdir()) == ["nan.msgpack", "nan.pth"]


def test_float64_weights_kept_are_refused(tmp, small):
    """--dtype keep of float64 weights wrote a checkpoint whose param_dtype load refuses."""
    d = tmp / "float64_keep"
    d.mkdir()
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in small[1].items()},
               d / "f64.pth")
    p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", d / "f64.pth", *SMALL_FLAGS,
            "--dtype", "keep", "--no-verify", "--out", d / "o")
    assert p.returncode == 2 and "--dtype keep: the weights are float64" in one_error_line(p)
    assert sorted(x.name for x in d.iterdir()) == ["f64.pth"]


@pytest.fixture(scope="session")
def converted_msgpack(tmp, small) -> Path:
    out = tmp / "converted_small.msgpack"
    cli(CLI.torch_to_flax_main, "vgg11", "--weights", small[0], "--out", out, "--no-verify",
        *SMALL_FLAGS, check=0)
    return out


F2T_ARGS_BAD = [  # (tag, arguments after the msgpack source, words the one line must hold)
    # weights of other shapes: a ScopeParamShapeError traceback, and with --no-verify exit 0
    # and tensors written under the wrong names
    ("other_shapes", ["--name", "vgg11"],
     ["holds vgg11 weights made with other fields", "pass --num-classes 10 --set width=0.25 "
      "--set hidden_size=64 --set pool_size=1,1"]),
    ("other_shapes_unverified", ["--name", "vgg11", "--no-verify"], ["pass --num-classes 10"]),
    ("other_variant", ["--name", "vgg13", *SMALL_FLAGS[:-2], "--no-verify"],
     ["does not hold vgg13 weights of these shapes", "params/conv1_2/kernel is missing"]),
    ("zero_classes", ["--name", "vgg11", "--num-classes", "0"], ["--num-classes 0"]),
    ("set_pool_int", ["--name", "vgg11", "--set", "pool_size=1"], ["--set pool_size=1"]),
    ("rtol_nan", ["--name", "vgg11", *SMALL_FLAGS[:-2], "--rtol", "nan"], ["--rtol nan"]),
    ("verify_batch_negative", ["--name", "vgg11", *SMALL_FLAGS[:-2], "--verify-batch", "-2"],
     ["--verify-batch -2"]),
]


@pytest.mark.parametrize("tag, args, expect", F2T_ARGS_BAD, ids=[c[0] for c in F2T_ARGS_BAD])
def test_flax_to_torch_bad_arguments_table(tmp, converted_msgpack, tag, args, expect):
    d = tmp / f"f2t_args_{tag}"
    d.mkdir()
    p = cli(CLI.flax_to_torch_main, converted_msgpack, "--out", d / "x.pth", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = one_error_line(p)
    for e in expect:
        assert e in line, line
    assert list(d.iterdir()) == []


@pytest.mark.parametrize("max_rel, why", [(0.5, "outputs differ beyond the tolerance"),
                                          (float("nan"), "the outputs are not finite (NaN or inf)")])
def test_failed_verification_summary_says_nothing_was_written(tmp, small, monkeypatch, max_rel,
                                                              why):
    """The summary does not print "-> OUT (orbax, 0.0 MB)" above "OUT was not written"."""
    from vgg_flax.convert import jobs
    monkeypatch.setattr(jobs.V, "verify", lambda *a, **k: V.Verification(
        2, 32, max_rel, max_rel, None, 1e-4, ("logits",)))
    monkeypatch.setattr(jobs.V, "flax_outputs", lambda *a, **k: None)
    d = tmp / f"verify_fails_{max_rel}"
    d.mkdir()
    p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", small[0], "--out", d / "o", *SMALL_FLAGS)
    assert p.returncode == 1, p.stderr
    assert f"-> nothing written to {d / 'o'} (verification failed)" in p.stdout, p.stdout
    assert "(orbax," not in p.stdout
    assert one_error_line(p) == (f"error: {why}; {d / 'o'} was not written (--no-verify writes "
                                 "it unchecked)")
    assert list(d.iterdir()) == []


def test_write_failure_is_one_line_and_cleans_up(tmp, small, monkeypatch):
    """A write that fails (read-only or full disk; as root a read-only directory is still
    writable, so the failure is injected): one line, exit 2, no temporary output, and the
    cleanup itself raises nothing more."""
    from vgg_flax.convert import formats

    def fail(path, *a, **k):
        Path(path).mkdir()
        (Path(path) / "part").write_text("half")
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(formats, "write_flax", fail)
    d = tmp / "t2f_write_fails"
    d.mkdir()
    p = cli(CLI.torch_to_flax_main, "vgg11", "--weights", small[0], "--out", d / "o", "--no-verify",
            *SMALL_FLAGS)
    assert p.returncode == 2 and "cannot write" in one_error_line(p)
    assert list(d.iterdir()) == []


F2T_BAD = [  # (tag, damage to a copy of a converted checkpoint, words the one line must hold)
    ("data_file_deleted", _drop_largest_array_file, ["damaged"]),
    ("invalid_json", lambda d: (d / "vgg_flax.json").write_text("{not json"), ["not valid JSON"]),
    ("no_name", lambda d: _write_info(d, lambda i: i.pop("name")), ["no \"name\""]),
    ("unknown_name", lambda d: _write_info(d, lambda i: i.update(name="vgg17")), ["vgg17"]),
]


@pytest.mark.parametrize("tag, damage, expect", F2T_BAD, ids=[c[0] for c in F2T_BAD])
def test_flax_to_torch_damaged_checkpoint_table(tmp, converted, tag, damage, expect):
    src = _damaged(converted, tmp, tag, damage)
    out_dir = tmp / f"f2t_bad_{tag}"
    out_dir.mkdir()
    p = cli(CLI.flax_to_torch_main, src, "--out", out_dir / "x.pth")
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = one_error_line(p)
    for e in expect:
        assert e in line, line
    assert list(out_dir.iterdir()) == []


def test_corrupt_torch_files_say_so_in_one_line(tmp):
    """Seeded truncations and byte flips of zip and legacy .pth files: each either loads or is
    refused with WeightFileError (never another exception type)."""
    from vgg_flax import torch_io
    sd = {f"features.{i}.weight": torch.randn(8, 4, 3, 3) for i in range(3)}
    rng = np.random.default_rng(0)
    for fmt, new_zip in (("zip", True), ("legacy", False)):
        good = tmp / f"fuzz_{fmt}.pth"
        torch.save(sd, good, _use_new_zipfile_serialization=new_zip)
        data = good.read_bytes()
        variants = [data[:int(c)] for c in rng.integers(1, len(data), 40)]
        for _ in range(40):
            b = bytearray(data)
            i, n = int(rng.integers(len(b))), int(rng.integers(1, 16))
            b[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            variants.append(bytes(b))
        for j, v in enumerate(variants):
            f = tmp / f"fuzz_{fmt}_{j}.pth"
            f.write_bytes(v)
            try:
                torch_io.open_weights(f)
            except torch_io.WeightFileError as err:
                assert "\n" not in str(err)
