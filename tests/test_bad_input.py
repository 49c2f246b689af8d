"""The bad-input contract of ``vgg_flax.load``, ``python -m vgg_flax.classify``,
``train/eval.py`` and ``train/export.py``: one line naming the problem and the fix, exit 2 for
bad arguments and files, no traceback, nothing left behind. Table-driven, in-process (each
CLI's own ``main``/``cli`` with argument parsing). The converter's and train/train.py's tables
live with their tests."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vgg_flax
from vgg_flax import classify
from vgg_flax.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_bad_input_{name}", ROOT / "train" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny saved vgg11 (10 classes), shared; cases copy it before damaging it."""
    from test_train import random_variables  # values do not matter here: no init compile
    module = vgg_flax.create("vgg11", **TINY)
    variables = random_variables(module, jnp.zeros((1, 32, 32, 3)), seed=0)
    return vgg_flax.save(tmp_path_factory.mktemp("ckpt") / "tiny", variables, "vgg11", module=module)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(path)
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def one_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def run_cli(main, argv):
    """(exit code, stdout, stderr) of ``main(argv)`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


# -- vgg_flax.load -------------------------------------------------------------------------------
def _edit_json(**change):
    def edit(d: Path):
        info = json.loads((d / "vgg_flax.json").read_text())
        for k, v in change.items():
            if k.startswith("overrides."):
                info["overrides"][k.split(".", 1)[1]] = v
            elif v is _DROP:
                info.pop(k)
            else:
                info[k] = v
        (d / "vgg_flax.json").write_text(json.dumps(info))
    return edit


_DROP = object()


def _write(text):
    return lambda d: (d / "vgg_flax.json").write_text(text)


def _delete_largest_data_file(d: Path):
    files = [f for f in (d / "variables").rglob("*") if f.is_file()]
    max(files, key=lambda f: f.stat().st_size).unlink()


LOAD_CASES = [
    ("not json", _write("{not json"), "is not valid JSON"),
    ("binary", lambda d: (d / "vgg_flax.json").write_bytes(b"\xff\xfe\x00"), "is not valid JSON"),
    ("a list", _write("[1, 2]"), "holds a JSON list"),
    ("future format", _edit_json(format="vgg_flax/99"), "unknown format 'vgg_flax/99'"),
    ("no format", _edit_json(format=_DROP), "unknown format None"),
    ("no name", _edit_json(name=_DROP), 'names no VGG (no "name")'),
    ("unknown name", _edit_json(name="vgg17"), "unknown VGG name 'vgg17'"),
    ("name not a string", _edit_json(name=16), "unknown VGG name 16"),
    ("overrides a list", _edit_json(overrides=[1]), "'overrides' must be an object"),
    ("num_classes text", _edit_json(**{"overrides.num_classes": "ten"}),
     'num_classes = "ten" must be a positive integer'),
    ("num_classes negative", _edit_json(**{"overrides.num_classes": -5}),
     "num_classes = -5 must be a positive integer"),
    ("num_classes zero", _edit_json(**{"overrides.num_classes": 0}), "num_classes = 0"),
    ("num_classes bool", _edit_json(**{"overrides.num_classes": True}), "num_classes = true"),
    ("num_classes float", _edit_json(**{"overrides.num_classes": 10.5}), "num_classes = 10.5"),
    ("width zero", _edit_json(**{"overrides.width": 0}), "width = 0 must be a finite number > 0"),
    ("width text", _edit_json(**{"overrides.width": "0.5"}), 'width = "0.5" must be a finite number'),
    ("cfg unknown token", _edit_json(**{"overrides.cfg": [64, "X"]}), 'cfg = [64, "X"] must be'),
    ("dropout above 1", _edit_json(**{"overrides.dropout_rate": 1.5}), "dropout_rate = 1.5"),
    ("pool_size one number", _edit_json(**{"overrides.pool_size": [7]}), "pool_size = [7]"),
    ("dtype int8", _edit_json(**{"overrides.dtype": "int8"}), 'dtype = "int8"'),
    ("head unknown", _edit_json(**{"overrides.head": "yolo"}), 'head = "yolo"'),
    ("unknown field", _edit_json(**{"overrides.colour": 1}), "unknown override 'colour'"),
    ("shapes edited", _edit_json(**{"overrides.hidden_size": 32}), "do not fit vgg11"),
    ("data file deleted", _delete_largest_data_file, "cannot read the stored variables"),
    ("variables deleted", lambda d: shutil.rmtree(d / "variables"), "variables directory is missing"),
    ("no vgg_flax.json", lambda d: (d / "vgg_flax.json").unlink(), "is not a vgg_flax checkpoint"),
]


@pytest.mark.parametrize("what, damage, message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_in_one_line(ckpt, tmp_path, what, damage, message):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    damage(d)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as e:
        vgg_flax.load(d)
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert str(d) in text  # names the checkpoint
    assert tree(tmp_path) == before


def test_save_refuses_what_load_would_refuse(ckpt, tmp_path):
    """save() without module= refuses variables of another shape than the name's defaults
    (load() would call such a checkpoint damaged): nothing is written."""
    from vgg_flax import WeightMismatchError
    _, variables = vgg_flax.load(ckpt)
    with pytest.raises(WeightMismatchError, match="do not fit vgg11.*pass module=") as e:
        vgg_flax.save(tmp_path / "x", variables, "vgg11")
    assert "\n" not in str(e.value) and "conv1_1/kernel is (3, 3, 3, 8)" in str(e.value)
    assert tree(tmp_path) == []


def test_every_value_the_field_rules_accept_is_saved_and_loaded(ckpt, tmp_path):
    """numpy scalars and lists pass the VGG's rules, so save must write them and load read them."""
    _, variables = vgg_flax.load(ckpt)
    module = vgg_flax.create("vgg11", num_classes=np.int64(10), width=np.float32(0.125),
                             hidden_size=np.int32(16), pool_size=[1, 1])
    loaded, _ = vgg_flax.load(vgg_flax.save(tmp_path / "x", variables, "vgg11", module=module))
    assert (loaded.num_classes, loaded.width, loaded.hidden_size, loaded.pool_size) == \
        (10, 0.125, 16, (1, 1))


def test_missing_json_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vgg_flax checkpoint"):
        vgg_flax.load(tmp_path)


# -- VGG fields: one table (fields.FIELDS), checked wherever a VGG is built ------------------------
def test_every_field_has_a_rule():
    from vgg_flax.fields import FIELDS
    fields = {f.name for f in dataclasses.fields(vgg_flax.VGG)} - {"parent", "name"}
    assert set(FIELDS) == fields


NAN = float("nan")
BAD_FIELDS = [  # (field, value, what the line says is allowed)
    ("width", -1, "a finite number > 0"),
    ("width", "0.5", "a finite number > 0"),
    ("width", NAN, "a finite number > 0"),
    ("dropout_rate", 1.5, "in [0, 1)"),
    ("dropout_rate", NAN, "in [0, 1)"),
    ("num_classes", 0, "a positive integer"),
    ("num_classes", -3, "a positive integer"),
    ("num_classes", 10.0, "a positive integer"),
    ("num_classes", True, "a positive integer"),
    ("hidden_size", 0, "a positive integer"),
    ("hidden_size", 64.5, "a positive integer"),
    ("pool_size", 7, "two positive integers"),
    ("pool_size", (7,), "two positive integers"),
    ("pool_size", (0, 7), "two positive integers"),
    ("taps", "relu1_1", "a tuple of layer names"),
    ("taps", ("relu1_1", 3), "a tuple of layer names"),
    ("dtype", "int8", "float32, bfloat16 or float16"),
    ("param_dtype", jnp.int8, "float32, bfloat16 or float16"),
    ("dtype", None, "float32, bfloat16 or float16"),
    ("conv", "cuda", "'auto', 'onednn' or 'xla'"),
    ("head", "yolo", "'fc' or 'ssd'"),
    ("cfg", (), "a non-empty sequence"),
    ("cfg", ("M",), "a non-empty sequence"),
    ("cfg", (64, "X"), "a non-empty sequence"),
    ("include_top", "yes", "True or False"),
    ("batch_norm", 1, "True or False"),
    ("bn_momentum", 2, "in [0, 1]"),
    ("bn_epsilon", 0, "a finite number > 0"),
    ("lrn_size", 0, "a positive integer"),
    ("lrn_beta", -1, "a finite number >= 0"),
    ("precision", "fastest-ever", "jax.lax.Precision"),
    ("precision", ("highest", None), "jax.lax.Precision"),
]


@pytest.mark.parametrize("field, value, allowed", BAD_FIELDS,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_field_is_one_line_naming_it(field, value, allowed):
    """create() and clone() refuse the value where it is set: the field, the value and what is
    allowed in one line, before anything is traced (unchecked, these values build 1-channel
    layers, (N, 0) logits, or fail at init with KeyError 'r', an MLIR error, or "str doesn't
    define __round__")."""
    for build in (lambda: vgg_flax.create("vgg11", **{field: value}),
                  lambda: vgg_flax.create("vgg11").clone(**{field: value})):
        with pytest.raises(ValueError) as e:
            build()
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"VGG field {field} ("), text
        assert f"got {value!r}" in text and allowed in text, text


def test_unknown_taps_fail_at_build_time():
    with pytest.raises(ValueError, match=r"taps: unknown tap\(s\) \['relu9_9'\]; this VGG has: conv1_1"):
        vgg_flax.create("vgg11", taps=("relu9_9",))


@pytest.mark.parametrize("value", [
    dict(width=np.float32(0.5)), dict(num_classes=np.int64(10)), dict(pool_size=[1, 1]),
    dict(taps=["relu1_1"]), dict(dtype="bfloat16"), dict(precision="highest"),
    dict(precision=("highest", "default")), dict(cfg=(64, "M", [128, 1], "M")), dict(dropout_rate=0),
], ids=lambda d: repr(d))
def test_good_field_values_are_accepted(value):
    """The rules refuse no value that works (a guard on the table above, not a defect)."""
    from vgg_flax.model import abstract_variables
    abstract_variables(vgg_flax.create("vgg11", **value))


@pytest.mark.parametrize("shape, message", [
    ((0, 32, 32, 3), "empty batch, shape (0, 32, 32, 3); pass at least one image"),
    ((2, 3, 64, 64), "looks channels-first (NCHW); VGG takes NHWC: x.transpose(0, 2, 3, 1)"),
    ((2, 1, 32, 32), "looks channels-first (NCHW)"),
    ((2, 16, 16, 3), "smaller than the 32x32 minimum of this VGG; resize the images up"),
])
def test_bad_batch_is_one_line(shape, message):
    module = vgg_flax.create("vgg11", **TINY)
    with pytest.raises(ValueError) as e:
        jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- vgg_flax.from_torch --------------------------------------------------------------------------
def test_from_torch_reads_a_training_checkpoint_like_the_converter(ckpt):
    """{"state_dict": sd, "epoch": 3} (the converter's CLI took it; from_torch raised
    AttributeError: 'dict' object has no attribute 'shape'): the same unwrapping, one place."""
    from vgg_flax.torch_io import STATE_DICT_KEYS
    module, variables = vgg_flax.load(ckpt)
    sd = vgg_flax.to_torch(variables, module, as_numpy=True)
    want = vgg_flax.from_torch(sd, module)
    for wrapped in ({"state_dict": sd, "epoch": 3}, {"model": {"state_dict": sd}, "step": 9},
                    *({key: sd, "optimizer": {}} for key in STATE_DICT_KEYS)):
        got = vgg_flax.from_torch(wrapped, module)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(vgg_flax.WeightMismatchError,
                       match=r"holds a dict without a state_dict \(keys: 'epoch'\)"):
        vgg_flax.from_torch({"epoch": 3}, module)


# -- python -m vgg_flax.classify -------------------------------------------------------------------
CLASSIFY_CASES = [
    ("scales text", ["--scales", "abc"], "--scales: expected comma-separated positive integers, got 'abc'"),
    ("scales zero", ["--scales", "256,0"], "--scales: expected positive integers"),
    ("top zero", ["--top", "0"], "--top: expected a positive integer, got 0"),
    ("top text", ["--top", "five"], "--top: expected a positive integer, got 'five'"),
    ("unknown protocol", ["--protocol", "tencrop"], "invalid choice: 'tencrop'"),
    ("unknown flag", ["--scale", "256"], "unrecognized arguments: --scale"),
    ("weights missing", ["--weights", "{tmp}/nothing"], "is not a vgg_flax checkpoint"),
    ("weights damaged", ["--weights", "{bad}"], "unknown VGG name 'vgg17'"),
    ("scale below crop", ["--protocol", "dense", "--scales", "100"], "smaller than the 224-pixel crop"),
]


@pytest.mark.parametrize("what, args, message", CLASSIFY_CASES, ids=[c[0] for c in CLASSIFY_CASES])
def test_classify_bad_arguments(ckpt, image, tmp_path, what, args, message):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    _edit_json(name="vgg17")(bad)
    args = [a.format(tmp=tmp_path, bad=bad) for a in args]
    if "--weights" not in args:
        args += ["--weights", ckpt]
    before = tree(tmp_path)
    code, out, err = run_cli(classify.main, [image, *args])
    assert code == 2, (code, out, err)
    assert message in one_line(err), err
    assert out == "" and tree(tmp_path) == before


def test_classify_warns_about_32_bit_images_in_one_line(ckpt, image, tmp_path):
    """A 16-bit PNG is scaled to 8 bits (images.to_8bit) and needs no warning; a 32-bit
    integer image has no known range, is clipped as torchvision clips it, and is named."""
    deep = tmp_path / "scan32.tif"
    Image.fromarray(np.full((40, 50), 40000, np.int32)).save(deep)
    assert Image.open(deep).mode == "I"
    sixteen = tmp_path / "scan16.png"
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I;16")
    code, out, err = run_cli(classify.main, [deep, sixteen, image, "--weights", ckpt, "--top", "2"])
    assert code == 0, err
    line = one_line(err)
    assert line.startswith(f"warning: {deep}: 32-bit (I)") and "rescale it to 8 bits" in line
    assert out.count("1. ") == 3  # every image still classified
    # an 8-bit image gets no warning
    code, _, err = run_cli(classify.main, [image, "--weights", ckpt])
    assert code == 0 and err == ""


# -- train/eval.py ---------------------------------------------------------------------------------
EVAL_CASES = [
    ("no source", ["--weights", "{ckpt}"], "one of the arguments --dataset --synthetic is required"),
    ("both sources", ["--weights", "{ckpt}", "--dataset", "x", "--synthetic", "8x8"], "not allowed with"),
    ("batch zero", ["--weights", "{ckpt}", "--synthetic", "40x40", "--batch-size", "0"],
     "--batch-size: expected a positive integer, got 0"),
    ("limit negative", ["--weights", "{ckpt}", "--synthetic", "40x40", "--limit", "-3"],
     "--limit: expected a positive integer, got -3"),
    ("threads text", ["--weights", "{ckpt}", "--synthetic", "40x40", "--threads", "many"],
     "--threads: expected a positive integer"),
    ("scales text", ["--weights", "{ckpt}", "--synthetic", "40x40", "--scales", "abc"],
     "--scales: expected comma-separated positive integers"),
    ("train scale three", ["--weights", "{ckpt}", "--synthetic", "40x40", "--protocol", "dense",
                           "--train-scale", "1,2,3"], "--train-scale takes S or S_min,S_max"),
    ("synthetic shape", ["--weights", "{ckpt}", "--synthetic", "forty"], "--synthetic wants HxW"),
    ("weights missing", ["--weights", "{tmp}/nothing", "--synthetic", "40x40"],
     "is not a vgg_flax checkpoint"),
    ("weights damaged", ["--weights", "{bad}", "--synthetic", "40x40"], "is not valid JSON"),
    ("dataset missing", ["--weights", "{ckpt}", "--dataset", "no_such_dataset_xyz",
                         "--data-dir", "{tmp}/tfds"], "cannot open TFDS dataset 'no_such_dataset_xyz'"),
]


@pytest.mark.parametrize("what, args, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_arguments(ckpt, tmp_path, what, args, message):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "vgg_flax.json").write_text("{")
    before = tree(tmp_path)
    code, out, err = run_cli(_script("eval").cli,
                             [a.format(ckpt=ckpt, tmp=tmp_path, bad=bad) for a in args])
    assert code == 2, (code, out, err)
    assert message in one_line(err), err
    assert out == "" and tree(tmp_path) == before


# -- train/export.py -------------------------------------------------------------------------------
EXPORT_CASES = [
    ("no out", ["--workdir", "{tmp}"], "the following arguments are required: --out"),
    ("step text", ["--workdir", "{tmp}", "--out", "{tmp}/out", "--step", "last"],
     "--step: expected an integer >= 0, got 'last'"),
    ("step negative", ["--workdir", "{tmp}", "--out", "{tmp}/out", "--step", "-1"],
     "--step: expected an integer >= 0, got -1"),
    ("workdir missing", ["--workdir", "{tmp}/nothing", "--out", "{tmp}/out"],
     "is not a training directory"),
    ("workdir is a file", ["--workdir", "{tmp}/file", "--out", "{tmp}/out"],
     "is not a training directory"),
    ("workdir not a run", ["--workdir", "{tmp}", "--out", "{tmp}/out"], "is not a training directory"),
]


@pytest.mark.parametrize("what, args, message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_bad_arguments(tmp_path, what, args, message):
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)
    code, out, err = run_cli(_script("export").main, [a.format(tmp=tmp_path) for a in args])
    assert code == 2, (code, out, err)
    assert message in one_line(err), err
    assert out == "" and tree(tmp_path) == before


def test_export_of_a_run_whose_model_load_would_refuse(tmp_path):
    """A run trained before its fields were checked (``--config.model_overrides.pool_size=7``
    became (7,) and trained) must not be exported as a checkpoint load() refuses: one line, and
    nothing is written. (The trainer refuses such a config up front: tests/test_train_inputs.py.)"""
    from train.configs import digits
    config = digits.get_config()
    config.model_overrides.pool_size = (7,)
    run = tmp_path / "run"
    run.mkdir()
    info = dict(num_classes=10, channels=1, train_size=1437, eval_size=360)
    (run / "train_config.json").write_text(json.dumps({"config": config.to_dict(),
                                                       "dataset_info": info}))
    code, out, err = run_cli(_script("export").main, ["--workdir", run, "--out", tmp_path / "out"])
    assert code == 2, (code, out, err)
    line = one_line(err)
    assert "model_overrides.pool_size" in line and "two positive integers" in line, line
    assert "got [7]" in line and out == "" and not (tmp_path / "out").exists()



def test_load_never_reaches_the_network(tmp_path, monkeypatch):
    """``load("vgg16")`` without a ./vgg16 directory is a one-line error pointing to
    ``pretrained``, and neither downloads nor converts (a call to the hub would raise)."""
    from vgg_flax import errors, hub, published

    def no_network(*_a, **_k):
        raise AssertionError("load() reached for published weights")
    monkeypatch.setattr(hub, "hub_file", no_network)
    monkeypatch.setattr(published, "pretrained", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.NotACheckpoint) as info:
        vgg_flax.load("vgg16")
    assert "vgg_flax.pretrained('vgg16')" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, vgg_flax.CheckpointError)
    assert isinstance(info.value, FileNotFoundError)


def test_one_hierarchy_for_weight_problems():
    """Every weight error is a ``vgg_flax.WeightsError`` and keeps the builtin callers catch."""
    from vgg_flax import errors
    from vgg_flax.convert import ConversionError
    expected = {errors.WeightFileError: ValueError, errors.WeightMismatchError: ValueError,
                errors.CheckpointError: ValueError, errors.NotACheckpoint: FileNotFoundError,
                ConversionError: ValueError, errors.WeightsUnavailableError: OSError}
    for cls, builtin in expected.items():
        assert issubclass(cls, vgg_flax.WeightsError) and issubclass(cls, builtin), cls
    found = {v for v in vars(errors).values()
             if isinstance(v, type) and issubclass(v, Exception) and v is not errors.WeightsError}
    assert found == set(expected)
