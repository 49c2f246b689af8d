"""Export: every VGG leaves the process as StableHLO (jax.export) and ONNX, and the artifacts
compute what the Flax model computes.

Small models at 32..96 pixels with seeded random weights whose biases, BatchNorm statistics and
L2Norm scales are all non-trivial, so a dropped term moves the outputs far beyond the
tolerances. Comparisons run under ``jax.default_matmul_precision("highest")``; the exported
programs use XLA's convolutions and the in-process model oneDNN's, so float32 outputs agree to
~1e-6 of their largest value, not bit for bit: the tolerance is 1e-5 relative (as max |diff| /
max |reference|).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_flax
from vgg_flax import export as E
from vgg_flax import onednn
from vgg_flax.model import abstract_variables

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
TINY = dict(num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))


def random_variables(module, seed=0, in_channels=3):
    """Seeded variables for ``module`` without compiling an init: kernels He-normal, every bias
    and BatchNorm shift +-[0.02, 0.1] (never 0), BN statistics and scales and SSD's L2Norm scale
    away from their 0/1/20 initial values."""
    rng = np.random.default_rng(seed)

    def signed(shape, low, high):
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(low, high, shape)

    def draw(path, leaf):
        layer, name, shape = path[-2].key, path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        elif name == "scale":
            value = rng.uniform(10, 30, shape) if "norm" in layer else rng.uniform(0.5, 1.5, shape)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # bias, mean
            value = signed(shape, 0.02, 0.1)
        return value.astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract_variables(module, in_channels))


def images(n, size, channels=3, seed=1):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).standard_normal((n, h, w, channels)).astype(np.float32)


def flax_outputs(module, variables, x):
    """name -> float32 array: the taps, or the one output under its artifact name."""
    with jax.default_matmul_precision("highest"):
        out = jax.jit(module.apply)(variables, x)
    out = out if isinstance(out, dict) else {E.output_names(module)[0]: out}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def assert_close(got, want, rtol=RTOL):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, w in want.items():
        g = np.asarray(got[name], np.float32)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        rel = np.max(np.abs(g - w)) / np.max(np.abs(w))
        assert rel <= rtol, f"{name}: max |diff| / max |ref| = {rel:.2e} > {rtol:g}"


def custom_call_targets(mlir_text):
    return set(re.findall(r"custom_call @(\w+)", mlir_text)) | set(
        re.findall(r'call_target_name = "(\w+)"', mlir_text))


# ---- jax.export on every model -----------------------------------------------------------------

@pytest.mark.parametrize("name", vgg_flax.list_models())
def test_every_model_exports_for_every_platform_with_a_symbolic_batch(name):
    module = vgg_flax.create(name)  # default fields, conv="auto"
    size = vgg_flax.metadata(name)["input_size"][0]
    batch, = jax.export.symbolic_shape("b")
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(module.apply), platforms=("cpu", "cuda", "tpu"))(
        abstract_variables(module), x)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    (out,) = exported.out_avals
    assert out.shape[0] == batch and out.shape[1:] == (
        (1000,) if module.head == "fc" else (19, 19, 1024))
    text = exported.mlir_module()
    assert "stablehlo.convolution" in text
    assert not custom_call_targets(text) & set(onednn._TARGETS), custom_call_targets(text)
    assert str(jax.export.deserialize(exported.serialize()).out_avals) == str(exported.out_avals)


def test_conv_onednn_refuses_export_in_one_line():
    module = vgg_flax.create("vgg11", conv="onednn", **TINY)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    # Without the extension conv="onednn" refuses sooner, where the convolution is written.
    why = "cannot be exported" if onednn.available() else "cannot run this convolution here"
    with pytest.raises(ValueError, match=why) as err:
        jax.export.export(jax.jit(module.apply))(abstract_variables(module), x)
    assert "\n" not in str(err.value)


# ---- StableHLO round trips ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    module = vgg_flax.create("vgg11_bn", **TINY)
    return module, random_variables(module)


def test_stablehlo_round_trip_at_two_batch_sizes(tiny):
    module, variables = tiny
    exported = E.to_stablehlo(module, variables, (None, 32, 32, 3))
    again = jax.export.deserialize(bytearray(exported.serialize()))
    assert str(again.in_avals[0].shape) == "(batch, 32, 32, 3)"
    for n in (1, 3):
        x = images(n, 32)
        with jax.default_matmul_precision("highest"):
            got = again.call(x)
        assert_close({"logits": got}, flax_outputs(module, variables, x))
    fixed = jax.export.deserialize(bytearray(
        E.to_stablehlo(module, variables, (3, 32, 32, 3)).serialize()))
    assert fixed.in_avals[0].shape == (3, 32, 32, 3)
    with pytest.raises(ValueError):  # a fixed batch is fixed
        fixed.call(images(2, 32))


def test_gradient_exports_and_matches_in_process():
    # The backward convolutions (oneDNN's in this process) lower to XLA's too.
    module = vgg_flax.create("vgg11", **TINY)
    variables = random_variables(module, seed=2)

    def loss(v, x):
        return jax.nn.logsumexp(module.apply(v, x), axis=-1).sum()

    batch, = jax.export.symbolic_shape("b")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))))(
        abstract, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
    assert not custom_call_targets(exported.mlir_module()) & set(onednn._TARGETS)
    again = jax.export.deserialize(bytearray(exported.serialize()))
    x = images(2, 32)
    with jax.default_matmul_precision("highest"):
        got = again.call(variables, x)
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) == len(jax.tree.leaves(variables)) + 1
    for g, w in zip(got_leaves, want_leaves):
        assert_close({"grad": g}, {"grad": np.asarray(w)}, rtol=1e-4)


# ---- both formats on every field combination ---------------------------------------------------

VARIANTS = {  # name, fields, input size, batch (None: symbolic)
    # LRN; taps on maps and on a fully connected layer after an uneven adaptive average pool
    # (a 3x3 map into 2x2 bins that overlap)
    "lrn_taps": ("vgg11_lrn", dict(TINY, pool_size=(2, 2), taps=("norm1", "pool2", "fc7")),
                 96, None),
    # BatchNorm (eval); dense evaluation: fc6-fc8 as convolutions over a 3x3 map, averaged
    "bn_dense": ("vgg11_bn", dict(TINY, pool_size=(2, 2), dense=True), 96, None),
    # 1x1 convolutions, no classifier (pool5's map), a fixed batch
    "c_no_top_batch3": ("vgg16_c", dict(width=0.125, include_top=False), 64, 3),
    # SSD: ceil-mode pool3, 3x3/1 pool5, dilated conv6, the L2Norm branch; 4 input channels
    "ssd_taps": ("vgg16_ssd", dict(width=0.125, hidden_size=64,
                                   taps=("conv4_3_norm", "relu7")), 40, None),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_formats_match_flax(variant, tmp_path):
    name, fields, size, batch = VARIANTS[variant]
    module = vgg_flax.create(name, **fields)
    channels = 4 if name == "vgg16_ssd" else 3
    variables = random_variables(module, in_channels=channels)
    for fmt in E.FORMATS:  # each verified by export() on a seeded batch (of 2 if symbolic)
        out = tmp_path / f"model{E.FORMATS[fmt]}"
        summary = E.export(module, variables, out, size=(size, size), batch=batch, label=name)
        assert summary.verification.ok and summary.verification.max_rel < RTOL, summary.lines()
        assert summary.verification.outputs == E.output_names(module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.stablehlo"]
    # The ONNX graph is torch's rewrite of the layer walk, not the traced Flax program: check it
    # here too, at another batch size, against the Flax model directly.
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert session.get_inputs()[0].shape == [batch or "batch", size, size, channels]
    assert [o.name for o in session.get_outputs()] == list(E.output_names(module))
    x = images(3, size, channels)
    assert_close(E.run(tmp_path / "model.onnx", x), flax_outputs(module, variables, x))


def test_bfloat16_exports_as_stablehlo_and_onnx_refuses_it(tiny, tmp_path):
    module, variables = tiny
    bf16 = module.clone(dtype=jnp.bfloat16)
    summary = E.export(bf16, variables, tmp_path / "m.stablehlo", size=(32, 32))
    assert summary.verification.ok and summary.verification.rtol == E.RTOL["bfloat16"]
    exported = jax.export.deserialize(bytearray((tmp_path / "m.stablehlo").read_bytes()))
    assert exported.in_avals[0].dtype == jnp.float32
    assert exported.out_avals[0].dtype == jnp.bfloat16
    with pytest.raises(E.ExportError, match="float32 only") as err:
        E.export(bf16, variables, tmp_path / "m.onnx", size=(32, 32))
    assert "\n" not in str(err.value) and not (tmp_path / "m.onnx").exists()


# ---- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """A vgg_flax.save directory of seeded random weights and the CLI run on it in two
    subprocesses at once, stablehlo and onnx: (directory, checkpoint, {format: (exit code,
    stdout, stderr)})."""
    root = tmp_path_factory.mktemp("export_cli")
    module = vgg_flax.create("vgg11", **TINY)
    ckpt = vgg_flax.save(root / "ckpt", random_variables(module, seed=3), "vgg11", module=module)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    runs = {"stablehlo": ["--out", "m.stablehlo", "--size", "32"],
            "onnx": ["--format", "onnx", "--out", "m.onnx", "--size", "32"]}
    procs = {k: subprocess.Popen([sys.executable, "-m", "vgg_flax.export", str(ckpt), *args],
                                 cwd=root, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, args in runs.items()}
    results = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[k] = (p.returncode, stdout, stderr)
    return root, ckpt, results


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_cli_writes_artifacts_that_run_and_match(cli_runs, fmt):
    root, ckpt, results = cli_runs
    code, stdout, stderr = results[fmt]
    assert code == 0 and not stderr.strip(), stderr[-3000:]
    verify_line, summary = stdout.strip().splitlines()
    assert verify_line.startswith("verify: ") and verify_line.endswith(": OK"), verify_line
    assert f"-> m.{fmt} ({fmt}, input batchx32x32x3" in summary, summary
    assert sorted(p.name for p in root.iterdir()) == ["ckpt", "m.onnx", "m.stablehlo"]
    module, variables = vgg_flax.load(ckpt)
    for n in (1, 3):  # as a user runs them (README "Deploying")
        x = images(n, 32, seed=n)
        if fmt == "stablehlo":
            exported = jax.export.deserialize(bytearray((root / "m.stablehlo").read_bytes()))
            got = np.asarray(exported.call(x))
        else:
            import onnxruntime as ort
            session = ort.InferenceSession(str(root / "m.onnx"))
            got, = session.run(None, {"images": x})
        assert_close({"logits": got}, flax_outputs(module, variables, x))


def run_main(argv, capfd):
    """``main`` in this process; stdout and stderr as file descriptors 1 and 2 saw them (so
    also what logging or a library prints)."""
    try:
        code = E.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


BAD = [  # (arguments after WEIGHTS, what the line must name)
    (["--out", "m.onnx", "--batch", "0"], "--batch"),
    (["--out", "m.onnx", "--batch", "-2"], "--batch"),
    (["--out", "m.onnx", "--batch", "100000"], "--batch"),
    (["--out", "m.onnx", "--batch", "two"], "--batch"),
    (["--out", "m.onnx", "--size", "0"], "--size"),
    (["--out", "m.onnx", "--size", "5000"], "--size"),
    (["--out", "m.onnx", "--size", "32,32,3"], "--size"),
    (["--out", "m.stablehlo", "--size", "8"], "--size 8,8"),  # found after loading
    (["--out", "m.onnx", "--rtol", "0"], "--rtol"),
    (["--out", "m.onnx", "--rtol", "1.5"], "--rtol"),
    (["--out", "m.onnx", "--rtol", "nan"], "--rtol"),
    (["--out", "m.onnx", "--dtype", "int8"], "--dtype"),
    (["--out", "m.onnx", "--dtype", "bfloat16"], "float32 only"),
    (["--out", "m.onnx", "--format", "tflite"], "--format"),
    (["--out", "m.onnx", "--format", "stablehlo"], "m.stablehlo"),
    (["--out", "m.stablehlo", "--format", "onnx"], "m.onnx"),
    (["--out", "m.bin"], "m.stablehlo or m.onnx"),
    (["--out", "existing.onnx"], "--force"),
    (["--out", "a_file/m.onnx"], "is a file"),
    (["--out", "a_dir.onnx", "--force"], "is a directory"),
    ([], "--out"),
]


@pytest.mark.parametrize("args,names", BAD, ids=[" ".join(a) or "no-out" for a, _ in BAD])
def test_cli_bad_arguments_exit_2_with_one_line(cli_runs, tmp_path, capfd, monkeypatch, args,
                                                names):
    _, ckpt, _ = cli_runs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing.onnx").write_bytes(b"keep")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.onnx").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_main([ckpt, *args], capfd)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "existing.onnx").read_bytes() == b"keep"


@pytest.mark.parametrize("kwargs,names", [
    (dict(size=(16, 16)), "--size 16,16"),
    (dict(batch=0), "--batch 0"),
    (dict(rtol=0.0), "--rtol"),
])
def test_library_refuses_before_any_work(tiny, tmp_path, kwargs, names):
    module, variables = tiny
    with pytest.raises(E.ExportError) as err:
        E.export(module, variables, tmp_path / "m.onnx", **kwargs)
    assert names in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_weights_that_are_not_a_checkpoint_exit_2(tmp_path, capfd):
    code, out, err = run_main([tmp_path / "nothing", "--out", tmp_path / "m.onnx"], capfd)
    assert code == 2 and len(err.splitlines()) == 1 and "vgg_flax.save" in err, err


# ---- verification ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_verify_rejects_an_artifact_of_other_weights(cli_runs, fmt):
    root, ckpt, results = cli_runs
    assert results[fmt][0] == 0
    module, variables = vgg_flax.load(ckpt)
    x = images(2, 32)
    right = E.verify(root / f"m.{fmt}", module, variables, x, rtol=1e-4)
    wrong = E.verify(root / f"m.{fmt}", module, random_variables(module, seed=4), x, rtol=1e-4)
    assert right.ok and right.max_rel < RTOL, right.line()
    assert not wrong.ok and wrong.max_rel > 0.1 and wrong.line().endswith("FAILED")


def test_cli_mismatch_exits_1_and_writes_nothing(cli_runs, tmp_path, capfd, monkeypatch):
    # The artifact is made from other weights than the ones verified against (a stand-in for
    # any bug between the model and the file): the CLI must notice, say so and leave nothing.
    _, ckpt, _ = cli_runs
    real = E.to_stablehlo

    def other_weights(module, variables, input_shape, **kw):
        return real(module, random_variables(module, seed=5), input_shape, **kw)
    monkeypatch.setattr(E, "to_stablehlo", other_weights)
    code, out, err = run_main([ckpt, "--out", tmp_path / "m.stablehlo", "--size", "32"], capfd)
    assert code == 1, err
    assert out.splitlines()[0].endswith("FAILED") and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []
