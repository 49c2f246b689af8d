"""vgg_flax.onednn: oneDNN convolutions inside XLA:CPU programs, against lax's convolution.

Whole-model agreement with torchvision (forward and training gradients, through these
convolutions) is in test_parity.py; here each geometry VGG uses, the fallbacks, and sharding.
"""
import contextlib
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vgg_flax import onednn

DN = ("NHWC", "HWIO", "NHWC")


def dn(x, w):
    return lax.conv_dimension_numbers(x.shape, w.shape, DN)


def test_built_and_loaded_on_x86_64_linux():
    """pip builds the extension on x86-64 Linux: if it did not, this is where CI says so (the
    library would otherwise fall back to XLA's convolutions without a word)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        assert not onednn.available() and onednn.why_unavailable()
        return
    assert onednn.available(), onednn.why_unavailable()
    assert onednn.version().startswith("3.")
    assert onednn.cpu_supports("float32")  # bf16 too where the CPU has AVX-512


# (input NHWC, kernel HWIO, strides, padding, kernel dilation): every convolution the VGG variants
# run (3x3 s1 p1; first layer with 3 channels; SSD conv6 atrous 3x3 d6 p6 and conv7 1x1; fc6 as a
# 7x7 VALID convolution in dense evaluation), plus strides and uneven padding.
GEOMETRIES = [
    ((2, 9, 7, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((1, 12, 12, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 19, 19, 16), (3, 3, 16, 24), (1, 1), ((6, 6), (6, 6)), (6, 6)),
    ((2, 5, 5, 24), (1, 1, 24, 32), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((1, 9, 11, 8), (7, 7, 8, 16), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 11, 10, 8), (3, 3, 8, 8), (2, 2), ((0, 1), (1, 2)), (1, 1)),
]


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[1])))
def test_forward_and_gradients_equal_lax(geometry, dtype, bias):
    """float32: within 1e-5 of the largest value of an f32 lax convolution at highest precision
    (a few ulps of accumulation order); bf16: within bf16's rounding (2^-8) of the f32 result of
    the same bf16 values, for y, dx, dw (and with the bias folded in, db). The backward passes
    run in this CPU's default layout (onednn.backward_layout); the next test runs the other."""
    _forward_and_gradients_equal_lax(geometry, dtype, bias)


@contextlib.contextmanager
def backward_layout(layout: str):
    """Within the block, every backward convolution runs in ``layout``: the extension reads it
    per call (VggFlaxOnednnSetBackwardLayout), so compiled programs follow it."""
    lib = onednn._load()[0]
    before = lib.VggFlaxOnednnBackwardLayout()
    lib.VggFlaxOnednnSetBackwardLayout(onednn.LAYOUTS.index(layout))
    try:
        yield
    finally:
        lib.VggFlaxOnednnSetBackwardLayout(before)


def test_the_other_backward_layout_equals_lax():
    """The backward activation layout this CPU does not use by default (blocked on CPUs with
    AVX-512, NHWC without), for every geometry, float32 (and bf16 where oneDNN runs it), with and
    without the bias: the same tolerances."""
    if not onednn.available():  # no extension, no layouts (test_built_and_loaded_... says where)
        assert onednn.backward_layout() is None
        return
    other = [name for name in onednn.LAYOUTS if name != onednn.backward_layout()][0]
    with backward_layout(other):
        assert onednn.backward_layout() == other
        for geometry in GEOMETRIES:
            for dtype in ["float32", "bfloat16"] if onednn.cpu_supports("bfloat16") else ["float32"]:
                for bias in (False, True):
                    _forward_and_gradients_equal_lax(geometry, dtype, bias)
    assert onednn.backward_layout() != other


def test_layout_environment_variable():
    """VGG_FLAX_ONEDNN_LAYOUT sets the backward layout for a process (the value this CPU does
    not default to, so that it shows); a value it does not know gets one warning line naming it,
    and the CPU's default."""
    default = onednn.backward_layout()
    if default is None:  # no extension: nothing reads the variable
        return
    other = [name for name in onednn.LAYOUTS if name != default][0]
    script = "from vgg_flax import onednn; print(onednn.backward_layout())"
    procs = {value: subprocess.Popen([sys.executable, "-c", script], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "VGG_FLAX_ONEDNN_LAYOUT": value})
             for value in (other, "NCHW")}
    out = {value: p.communicate(timeout=120) for value, p in procs.items()}
    warnings = {value: [line for line in err.splitlines() if "VGG_FLAX_ONEDNN_LAYOUT" in line]
                for value, (_, err) in out.items()}
    assert out[other][0] == other + "\n" and warnings[other] == [], out[other]
    assert out["NCHW"][0] == default + "\n", out["NCHW"]
    assert len(warnings["NCHW"]) == 1, out["NCHW"]
    assert "VGG_FLAX_ONEDNN_LAYOUT='NCHW' is not one of ('nhwc', 'blocked')" in warnings["NCHW"][0]


def _forward_and_gradients_equal_lax(geometry, dtype, bias):
    xs, ws, strides, padding, dil = geometry
    rng = np.random.default_rng(0)  # numpy: eager jax.random compiles a sampler per shape
    x = jnp.asarray(rng.standard_normal(xs, np.float32)).astype(dtype)
    w = jnp.asarray(rng.standard_normal(ws, np.float32) / np.sqrt(np.prod(ws[:3]))).astype(dtype)
    b = jnp.asarray(rng.standard_normal(ws[3:], np.float32)).astype(dtype)

    def ours(x, w, b):
        return onednn.conv(x, w, b if bias else None, strides=strides, padding=padding,
                           dilation=dil, impl="auto")

    def ref(x, w, b):
        y = lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil,
                                     dimension_numbers=dn(x, w), precision="highest")
        return y + b if bias else y

    # bf16 runs on oneDNN only on CPUs with AVX-512 (else XLA's convolution, as asked here)
    hlo = jax.jit(ours).lower(x, w, b).compile().as_text()
    assert ("vgg_flax_conv" in hlo) == onednn.cpu_supports(dtype)
    y, vjp = jax.vjp(jax.jit(ours), x, w, b)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32)).astype(dtype)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    y_ref, vjp_ref = jax.vjp(jax.jit(ref), f32(x), f32(w), f32(b))  # jitted: not op by op
    tol = 1e-5 if dtype == "float32" else 2 ** -8
    names = ("dx", "dw", "db") if bias else ("dx", "dw")
    for name, got, want in [("y", y, y_ref), *zip(names, vjp(g), vjp_ref(f32(g)))]:
        assert got.dtype == x.dtype, name
        err = float(jnp.abs(f32(got) - want).max() / jnp.abs(want).max())
        assert err <= tol, (name, err)


def test_other_convolutions_stay_on_lax():
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    cases = {
        "float16": (x.astype(jnp.float16), w.astype(jnp.float16), {}),
        "feature groups": (x, w[:, :, :2], {"feature_group_count": 2}),
        "input dilation": (x, w, {"lhs_dilation": (2, 2)}),
        "negative padding": (x, w, {"padding": ((-1, 0), (0, 0))}),
        "f32 result of bf16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                               {"preferred_element_type": jnp.float32}),
    }
    for what, (a, b, kw) in cases.items():
        kw = {"padding": ((1, 1), (1, 1)), **kw}
        f = lambda a, b: onednn.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), dimension_numbers=dn(a, b), **kw)
        jaxpr = str(jax.make_jaxpr(f)(a, b))
        assert "conv_general_dilated" in jaxpr and "vgg_flax_conv" not in jaxpr, what
    # NCHW is lax's too
    nchw = lax.conv_dimension_numbers((1, 4, 8, 8), (4, 4, 3, 3), ("NCHW", "OIHW", "NCHW"))
    jaxpr = str(jax.make_jaxpr(lambda a, b: onednn.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=nchw))(jnp.ones((1, 4, 8, 8)), jnp.ones((4, 4, 3, 3))))
    assert "vgg_flax_conv" not in jaxpr


def test_same_padding_string_and_implementations():
    x, w = jnp.ones((1, 7, 7, 4)), jnp.ones((3, 3, 4, 2))
    same = onednn.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn(x, w))
    ref = lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn(x, w))
    np.testing.assert_allclose(same, ref, rtol=1e-6)
    # impl="xla" never binds the primitive; "onednn" refuses what oneDNN cannot run, in one line
    assert "vgg_flax_conv" not in str(jax.make_jaxpr(
        lambda a, b: onednn.conv(a, b, padding="SAME", impl="xla"))(x, w))
    with pytest.raises(ValueError, match="conv='onednn' cannot run .*float16.*conv='auto'"):
        onednn.conv(x.astype(jnp.float16), w.astype(jnp.float16), impl="onednn")
    with pytest.raises(ValueError, match="must be one of"):
        onednn.conv(x, w, impl="cudnn")


def test_mixed_dtypes_round_the_kernel_inside():
    """bf16 activations with float32 kernel and bias (what a bf16 model with float32 parameters
    runs): the same as rounding the kernel to bf16 first, gradients in the parameters' dtype."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8), np.float32) * 0.1)
    b = jnp.asarray(rng.standard_normal((8,), np.float32))
    f = lambda x, w, b: onednn.conv(x, w, b, padding="SAME")  # noqa: E731
    y, vjp = jax.vjp(f, x, w, b)
    assert y.dtype == jnp.bfloat16
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    want = lax.conv_general_dilated(f32(x), f32(w.astype(jnp.bfloat16)), (1, 1), "SAME",
                                    dimension_numbers=dn(x, w), precision="highest") + b
    assert np.abs(f32(y) - want).max() <= 2 ** -8 * np.abs(want).max()
    dx, dw, db = vjp(jnp.ones_like(y))
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    # ReLU applied as oneDNN writes y, and its derivative (0 where y is 0)
    relu = lambda x, w, b: onednn.conv(x, w, b, padding="SAME", relu=True)  # noqa: E731
    y_relu, vjp_relu = jax.vjp(relu, x, w, b)
    np.testing.assert_array_equal(f32(y_relu), np.maximum(f32(y), 0))
    want = jax.vjp(lambda *a: jax.nn.relu(f(*a)), x, w, b)[1](jnp.ones_like(y))
    for got, ref in zip(vjp_relu(jnp.ones_like(y)), want):
        np.testing.assert_array_equal(f32(got), f32(ref))
    # The other way round (float32 activations, bfloat16 parameters kept from a bf16 file):
    # oneDNN has no such kernel, so the parameters are widened exactly and the result is f32.
    wb, bb = w.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    y, vjp = jax.vjp(f, f32(x), wb, bb)
    want = lax.conv_general_dilated(f32(x), f32(wb), (1, 1), "SAME", dimension_numbers=dn(x, w),
                                    precision="highest") + f32(bb)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert [g.dtype for g in vjp(jnp.ones_like(y))] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]


def test_vmap_and_remat():
    """vmap over images, kernels or both, per-example gradients; jax.checkpoint recomputes."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 5), np.float32))
    f = lambda x, w: onednn.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn(x, w))
    ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn(x, w), precision="highest")
    ws = jnp.stack([w, -w, 2 * w])
    for axes, args in [((0, None), (x, w)), ((0, 0), (x, ws)), ((None, 0), (x[0], ws))]:
        np.testing.assert_allclose(jax.vmap(f, axes)(*args), jax.vmap(ref, axes)(*args),
                                   rtol=1e-5, atol=1e-5)
    # per-example weight gradients (the weight gradient must not sum over the mapped axis)
    per_example = lambda conv: jax.vmap(jax.grad(  # noqa: E731
        lambda w, x: jnp.sum(jnp.sin(conv(x, w)))), (None, 0))
    np.testing.assert_allclose(per_example(f)(w, x), per_example(ref)(w, x), rtol=1e-4,
                               atol=1e-4)
    loss = lambda conv: lambda w: jnp.sum(jax.checkpoint(conv)(x[0], w) ** 2)  # noqa: E731
    # within 1e-5 of the largest value, as above: a sum of terms ~1e3 has absolute error ~1e-5
    # whatever its size, and oneDNN's summation order depends on the CPU's vector width
    got, want = jax.grad(loss(f))(w), jax.grad(loss(ref))(w)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from vgg_flax import onednn

    dn = lax.conv_dimension_numbers((8, 10, 10, 8), (3, 3, 8, 16), ("NHWC", "HWIO", "NHWC"))
    def loss(conv):
        def f(x, w, w2, b):
            y = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
            # a second layer with its bias folded in (weight and bias gradients both summed)
            if conv is lax.conv_general_dilated:
                z = conv(jnp.tanh(y), w2, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn) + b
            else:
                z = onednn.conv(jnp.tanh(y), w2, b, padding=((1, 1), (1, 1)))
            return jnp.sum(jnp.tanh(z)), y
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 10, 10, 8), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16), np.float32) * 0.1)
    w2 = jnp.asarray(rng.standard_normal((3, 3, 16, 16), np.float32) * 0.1)
    b = jnp.asarray(rng.standard_normal((16,), np.float32))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, None, "model")))  # FSDP-like
    step = jax.jit(loss(onednn.conv_general_dilated))
    (l, y), (dx, dw, dw2, db) = step(xs, ws, w2, b)
    with jax.default_matmul_precision("highest"):
        (l0, y0), (dx0, dw0, dw20, db0) = jax.jit(loss(lax.conv_general_dilated))(x, w, w2, b)
    for got, want in [(l, l0), (y, y0), (dx, dx0), (dw, dw0), (dw2, dw20), (db, db0)]:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert y.sharding.spec[0] == "data", y.sharding
    hlo = step.lower(xs, ws, w2, b).compile().as_text()
    assert hlo.count("vgg_flax_conv_bwd_weights_bias") == 1, "the bias layer ran on oneDNN"
    # the batch stays split: every device convolves its 2 examples, never all 8
    assert "f32[2,10,10,16]" in hlo and "f32[8,10,10,16]" not in hlo
    assert "all-reduce" in hlo  # the weight gradient's sum over the batch shards
    print("ok")
""")


def test_batch_sharded_convolution_partitions_along_the_batch():
    """Under jit over 8 devices with the batch on 'data': results equal one device, each device
    convolves only its slice, and the weight gradient is summed across the slices."""
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


SHARED_KEY = textwrap.dedent("""
    import os, warnings
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from vgg_flax import onednn
    jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.ones((2, 8, 8, 4)), NamedSharding(mesh, P("data")))
    w = jnp.ones((3, 3, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hlo = jax.jit(lambda x, w: onednn.conv(x, w, padding=((1, 1), (1, 1)))).lower(
            x, w).compile().as_text()
    assert "vgg_flax_conv" not in hlo and "convolution" in hlo, "oneDNN kept"
    assert any("jax_remove_custom_partitioning_ptr_from_cache_key" in str(c.message)
               for c in caught), [str(c.message) for c in caught]
    one = jax.jit(lambda x, w: onednn.conv(x, w, padding=((1, 1), (1, 1)))).lower(
        jnp.ones((2, 8, 8, 4)), w).compile().as_text()
    assert "vgg_flax_conv" in one  # one device: no partitioner, nothing behind a pointer
    try:
        jax.jit(lambda x, w: onednn.conv(x, w, padding=((1, 1), (1, 1)), impl="onednn")).lower(
            x, w).compile()
        raise SystemExit("impl='onednn' did not refuse")
    except ValueError as e:
        assert "unset it" in str(e), e
    print("ok")
""")


def test_a_cache_key_without_the_partitioner_falls_back_to_xla():
    """With jax_remove_custom_partitioning_ptr_from_cache_key set, two partitioned convolutions
    that differ only in padding shared a persistent-cache entry (wrong results): over several
    devices the convolution then runs on XLA's, with a warning; conv='onednn' refuses."""
    out = subprocess.run([sys.executable, "-c", SHARED_KEY], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
