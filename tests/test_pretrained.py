"""vgg_flax.pretrained, timm's layout and the converter's hf: weights, against timm's own model.

No network: a Hugging Face cache laid out as huggingface_hub lays it out (blob under
snapshots/<rev>/, refs/main) holding timm's vgg11 with seeded random weights, read with
HF_HUB_OFFLINE. vgg11 is the smallest variant timm publishes; its full size is the property
(pretrained's shape checks are strict), so one session fixture builds it once.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

import vgg_flax
from vgg_flax import checkpoint, timm_layout
from vgg_flax.convert import cli, mapping, sources

P = importlib.import_module("vgg_flax.published")  # the module of vgg_flax.pretrained

ROOT = Path(__file__).resolve().parents[1]
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def timm_vgg11(tmp_path_factory):
    """timm's vgg11 (seeded random weights, every bias non-zero) and its model.safetensors."""
    with torch.device("meta"):
        model = timm.create_model("vgg11", pretrained=False)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1, generator=gen)
            else:
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5, generator=gen)
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def fake_hf_cache(root: Path, repo: str, file: Path) -> Path:
    """huggingface_hub's cache layout: models--OWNER--NAME/{blobs,snapshots/REV,refs/main}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / REV).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    os.link(file, folder / "snapshots" / REV / "model.safetensors")  # no 530 MB copy
    return root


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, timm_vgg11):
    return fake_hf_cache(tmp_path_factory.mktemp("hf") / "hub", "timm/vgg11.tv_in1k", timm_vgg11[1])


@pytest.fixture
def offline(monkeypatch, hf_cache):
    # huggingface_hub reads HF_HUB_OFFLINE/HF_HUB_CACHE once, at import: set its constants.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    return hf_cache


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_cache):
    """pretrained('vgg11') from the fake HF cache into a fresh vgg_flax cache (first call)."""
    cache = tmp_path_factory.mktemp("vgg_flax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
        module, variables = vgg_flax.pretrained("vgg11", cache_dir=cache, progress=False)
    return cache, module, variables


def assert_on_device(variables):
    """What a user receives: jax.Arrays on the default device (numpy leaves would be copied to
    the device again by every call of a jitted apply), float32 as torchvision's weights."""
    for leaf in jax.tree.leaves(variables):
        assert isinstance(leaf, jax.Array) and leaf.devices() == {jax.devices()[0]}, type(leaf)
        assert leaf.dtype == np.float32


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def test_pretrained_from_hf_equals_timm(timm_vgg11, converted):
    model, _ = timm_vgg11
    cache, module, variables = converted
    assert_on_device(variables)  # converted in this call
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(variables, x))
    want = _torch_out(model, x)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5  # measured 7e-7
    # cached atomically: the entry and nothing else (no temporary siblings left)
    assert sorted(os.listdir(cache)) == ["vgg11.IMAGENET1K_V1"]
    info = checkpoint.read_info(cache / "vgg11.IMAGENET1K_V1")
    assert info["name"] == "vgg11" and info["converted_from"]["source"].startswith("hf:timm/vgg11")


def test_timm_layout_is_timms_filter_inverted(timm_vgg11):
    model, _ = timm_vgg11
    sd = model.state_dict()
    assert timm_layout.is_timm_layout(sd)
    tv = timm_layout.to_torchvision(sd)
    assert not timm_layout.is_timm_layout(tv)
    # timm's own torchvision -> timm filter gives the state_dict back, bit for bit
    back = timm.models.vgg._filter_fn(tv)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    import torchvision
    with torch.device("meta"):
        ref = torchvision.models.vgg11()
    assert {k: tuple(v.shape) for k, v in tv.items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_second_call_reads_the_cache_and_converts_nothing(converted, monkeypatch):
    cache, _, variables = converted

    def fail(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(mapping, "prepare", fail)
    monkeypatch.setattr(P, "hub_file", fail)
    _, again = vgg_flax.pretrained("vgg11", cache_dir=cache)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    assert_on_device(again)  # read from the cache


def test_num_classes_reinitialises_the_head_with_a_warning(converted):
    cache, _, variables = converted
    with pytest.warns(UserWarning, match=r"fc8 is re-initialised for num_classes=10"):
        module, v = vgg_flax.pretrained("vgg11", cache_dir=cache, num_classes=10, seed=1)
    assert module.num_classes == 10 and v["params"]["fc8"]["kernel"].shape == (4096, 10)
    assert_on_device(v)
    assert 0.009 < v["params"]["fc8"]["kernel"].std() < 0.011
    assert not v["params"]["fc8"]["bias"].any()
    np.testing.assert_array_equal(v["params"]["fc7"]["kernel"], variables["params"]["fc7"]["kernel"])
    # no top: the classifier is dropped; taps pass through
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module, v = vgg_flax.pretrained("vgg11", cache_dir=cache, include_top=False,
                                        taps=("relu5_2",))
    assert "fc6" not in v["params"] and module.taps == ("relu5_2",)


def test_nnx_pretrained_holds_the_same_weights(converted):
    """vgg_flax.nnx.pretrained: the native NNX model holding the cached weights as they are
    (device arrays, no copy of the 530 MB), its fields passed on; no forward pass needed (the
    NNX forward's parity is test_parity.py's)."""
    import vgg_flax.nnx as vn
    from flax import nnx
    cache, _, variables = converted
    model = vn.pretrained("vgg11", cache_dir=cache, taps=("relu5_2",))
    assert isinstance(model, vn.VGG) and model.taps == ("relu5_2",) and model.in_channels == 3
    _, got = vn.to_linen(model)
    jax.tree.map(np.testing.assert_array_equal, got, variables)
    assert_on_device(nnx.state(model, nnx.Param))


def test_shape_changing_fields_are_refused(converted):
    with pytest.raises(vgg_flax.WeightMismatchError, match="may change only num_classes") as e:
        vgg_flax.pretrained("vgg11", cache_dir=converted[0], width=0.5)
    assert "\n" not in str(e.value)


def test_unknown_or_unpublished_names(tmp_path):
    with pytest.raises(ValueError, match="unknown VGG 'vgg17'"):
        vgg_flax.pretrained("vgg17", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vgg16_c has no published weights"):
        vgg_flax.pretrained("vgg16_c", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="its published weights are 'IMAGENET1K_FEATURES'"):
        vgg_flax.pretrained("vgg16_ssd", "IMAGENET1K_V1", cache_dir=tmp_path)


def test_torch_blocked_offline_error_then_hf(tmp_path, hf_cache, converted):
    """As on a TPU VM without torch: an import hook refuses torch. vgg13 is nowhere (one-line
    error naming every place and the converter command), with HF_HUB_OFFLINE and without it on a
    network where nothing answers (a dead proxy): then in one request, not huggingface_hub's
    23 s of retries, and the error says how to stay offline. vgg11 comes from the HF cache, and
    the process never imports torch."""
    script = textwrap.dedent("""
        import sys, time
        sys.modules["torch"] = None          # `import torch` raises ImportError
        sys.modules["torchvision"] = None
        import vgg_flax
        from huggingface_hub import constants
        try:
            vgg_flax.pretrained("vgg13", progress=False)
        except vgg_flax.WeightsUnavailableError as err:
            print("ERROR:" + str(err))
        constants.HF_HUB_OFFLINE = False
        start = time.time()
        try:
            vgg_flax.pretrained("vgg13", progress=False)
        except vgg_flax.WeightsUnavailableError as err:
            print(f"NO ANSWER:{time.time() - start:.2f}:{err}")
        module, variables = vgg_flax.pretrained("vgg11", progress=False)
        assert sys.modules["torch"] is None, "torch was imported"
        print("OK")
    """)
    dead = "http://127.0.0.1:9"  # nothing listens: every request fails at once, on any machine
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache),
               VGG_FLAX_CACHE=str(tmp_path / "cache"), https_proxy=dead, HTTPS_PROXY=dead,
               no_proxy="", NO_PROXY="")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "OK"
    _, seconds, no_answer = next(l for l in lines if l.startswith("NO ANSWER:")).split(":", 2)
    assert float(seconds) < 10, seconds  # huggingface_hub's own retries would take 23-29 s
    assert "timm/vgg13.tv_in1k (no answer: ConnectError" in no_answer
    assert "set HF_HUB_OFFLINE=1" in no_answer and "\n" not in no_answer
    assert "Retrying" not in r.stderr and "Downloading" not in r.stdout + r.stderr, r.stderr
    error = next(line for line in lines if line.startswith("ERROR:"))
    for part in (f"vgg_flax's cache {tmp_path / 'cache' / 'vgg13.IMAGENET1K_V1'}",
                 "Hugging Face hub timm/vgg13.tv_in1k (HF_HUB_OFFLINE is set",
                 "torch/torchvision not installed",
                 "python convert/torch_to_flax.py vgg13 --weights hf:timm/vgg13.tv_in1k"):
        assert part in error, error
    # what the torch-less process cached is what this one converted
    _, variables = checkpoint.load(tmp_path / "cache" / "vgg11.IMAGENET1K_V1")
    jax.tree.map(np.testing.assert_array_equal, variables, converted[2])


def test_torch_hub_cache_when_the_hub_has_nothing(tmp_path, timm_vgg11, converted, monkeypatch):
    """Source 3: HF offline with an empty cache, torchvision's vgg11 file in torch's hub cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(timm_layout.to_torchvision(timm_vgg11[0].state_dict()), hub / "vgg11-8a719046.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, v = vgg_flax.pretrained("vgg11", cache_dir=tmp_path / "cache", progress=False)
    jax.tree.map(np.testing.assert_array_equal, v, converted[2])
    info = checkpoint.read_info(tmp_path / "cache" / "vgg11.IMAGENET1K_V1")
    assert info["converted_from"]["source"].startswith("VGG11_Weights.IMAGENET1K_V1")


def test_ssd_backbone_features_from_torch_hub(tmp_path, monkeypatch):
    """vgg16_ssd: torchvision's IMAGENET1K_FEATURES (SSD300's backbone), conv6/conv7 initialised
    as ssd300_vgg16 does, with the converter's notes as warnings."""
    import torchvision
    torch.manual_seed(0)
    features = torchvision.models.vgg16().features
    with torch.no_grad():
        for name, q in features.named_parameters():
            if name.endswith("bias"):
                q.uniform_(-0.1, 0.1)
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(sd, hub / "vgg16_features-amdegroot-88682ab5.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="conv6/conv7: initialised as torchvision's ssd300_vgg16"):
        module, v = vgg_flax.pretrained("vgg16_ssd", cache_dir=tmp_path / "cache", progress=False)
    assert module.head == "ssd"
    np.testing.assert_array_equal(v["params"]["conv5_3"]["kernel"],
                                  sd["features.28.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["conv4_3_norm"]["scale"], 20.0)
    assert (tmp_path / "cache" / "vgg16_ssd.IMAGENET1K_FEATURES" / "vgg_flax.json").is_file()


def test_no_answer_from_the_hub_means_no_torch_download(tmp_path, monkeypatch, capsys):
    """When the hub does not answer, torch is not asked to download either (it printed
    'Downloading: "https://..."' and failed): torch's hub cache is only looked at, one line."""
    def unreachable(*a, **k):
        raise P.HubUnreachable("ConnectError: [Errno -2] Name or service not known")

    def fail(*a, **k):
        raise AssertionError("asked torch for the weights")
    monkeypatch.setattr(P, "hub_file", unreachable)
    monkeypatch.setattr(mapping, "prepare", fail)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(vgg_flax.WeightsUnavailableError) as e:
        vgg_flax.pretrained("vgg11", cache_dir=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "set HF_HUB_OFFLINE=1" in msg
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints' / 'vgg11-8a719046.pth'} absent" in msg
    assert capsys.readouterr().out == ""


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies half way leaves no entry (the next call converts again), only a warning."""
    def dies(path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "vgg_flax.json").write_text("{")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write", dies)
    # variables that fit (save refuses others before writing): a tiny vgg11's, as zeros
    module = vgg_flax.create("vgg11", num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                             vgg_flax.model.abstract_variables(module))
    with pytest.warns(UserWarning, match="could not cache vgg11's converted weights"):
        P._store(tmp_path / "vgg11.IMAGENET1K_V1", variables, "vgg11", module, {})
    assert os.listdir(tmp_path) == []


def test_converter_reads_timm_files_and_hf(tmp_path, timm_vgg11, offline, converted, capsys):
    _, path = timm_vgg11
    # what `torch_to_flax.py vgg11 --weights model.safetensors` converts (in memory here)
    _, v = mapping.load_torch_weights("vgg11", str(path), progress=False)
    jax.tree.map(np.testing.assert_array_equal, v, converted[2])
    # hf:OWNER/REPO[/FILE] is that file, from huggingface_hub's cache (offline here)
    for spec in ("hf:timm/vgg11.tv_in1k", "hf:timm/vgg11.tv_in1k/model.safetensors"):
        src = sources.resolve_weights("vgg11", spec)
        assert src.path.samefile(path) and src.label.startswith(spec)
    assert cli.torch_to_flax_main(["vgg11", "--weights", "hf:timm/vgg99.tv_in1k", "--out",
                                       str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot get model.safetensors of Hugging Face repo "
                          "timm/vgg99.tv_in1k") and "\n" not in err


def test_classify_and_eval_take_a_model_name(converted, monkeypatch, tmp_path, capsys):
    """--weights NAME is vgg_flax.pretrained(NAME) (published.weights_argument), here through the cache
    in $VGG_FLAX_CACHE."""
    from PIL import Image

    from vgg_flax import classify
    monkeypatch.setenv("VGG_FLAX_CACHE", str(converted[0]))
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(img)
    assert classify.main([str(img), "--weights", "vgg11", "--top", "2"]) == 0
    assert capsys.readouterr().out.count("%") == 2
    spec = importlib.util.spec_from_file_location("vgg_flax_eval_cli", ROOT / "train" / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    result = eval_cli.main(["--weights", "vgg11", "--synthetic", "64x64", "--limit", "2",
                            "--crop-size", "64", "--resize-size", "72", "--batch-size", "2"])
    assert result["images"] == 2 and "vgg11" in capsys.readouterr().out
