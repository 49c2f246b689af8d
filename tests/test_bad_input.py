"""The bad-input contract of ``vgg_flax.load``, ``python -m vgg_flax.classify``,
``train/eval.py`` and ``train/export.py``: one line naming the problem and the fix, exit 2 for
bad arguments and files, no traceback, nothing left behind. Table-driven, in-process (each
CLI's own ``main``/``cli`` with argument parsing). The converter's and train/train.py's tables
live with their tests."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

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
    ("width zero", _edit_json(**{"overrides.width": 0}), "width = 0 must be a positive number"),
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


def test_missing_json_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vgg_flax checkpoint"):
        vgg_flax.load(tmp_path)


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


def test_classify_warns_about_16_bit_png_in_one_line(ckpt, image, tmp_path):
    deep = tmp_path / "scan16.png"
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    code, out, err = run_cli(classify.main, [deep, image, "--weights", ckpt, "--top", "2"])
    assert code == 0, err
    line = one_line(err)
    assert line.startswith(f"warning: {deep}: I") and "rescale it to 8 bits" in line
    assert out.count("1. ") == 2  # both images still classified
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
     "--step: invalid int value: 'last'"),
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
