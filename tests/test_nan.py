"""NaN and infinities through vgg_flax's convolutions, as XLA's convolution and torch give them.

One NaN or infinite weight or pixel must come out of every path the same way: conv="auto"
(oneDNN here, the ReLU applied as oneDNN writes the output), conv="xla" and torch. oneDNN's own
ReLU post-op was max(y, 0) returning 0 for NaN: one NaN weight in conv3_1 gave finite logits.

Compared: the positions of NaN, +inf and -inf exactly; finite values within 1e-5 (float32, matmul
precision "highest") or 2^-6 (bfloat16: rounding of the output and of the bias add) of the
largest finite reference value. Backward: the ReLU passes the gradient where its output is
positive or NaN (torch's threshold_backward), on both paths. Budget: ~40 s (a VGG-11 at 1/8 width
compiled four times; two subprocesses with oneDNN held to AVX2 and AVX).
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg as tv

import vgg_flax
from torch_ref import nhwc, randomize
from vgg_flax import onednn
from vgg_flax.arch import scale

F32_RTOL, BF16_RTOL = 1e-5, 2 ** -6


def assert_same(got, want, rtol, what):
    """NaN, +inf and -inf at the same positions; finite values within rtol of the largest."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    for name, where in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        g, w = where(got), where(want)
        assert (g == w).all(), f"{what}: {name} at {int((g & ~w).sum())} extra and " \
                               f"{int((w & ~g).sum())} missing positions (of {int(w.sum())})"
    finite = np.isfinite(want)
    top = np.abs(want[finite]).max(initial=0.0) or 1.0
    err = np.abs(got[finite] - want[finite]).max(initial=0.0)
    assert err <= rtol * top, f"{what}: max |diff| {err:.3g} > {rtol:.1g} * {top:.3g}"


# -- one convolution + bias + ReLU: every case against torch -------------------------------------
def _poisoned(case, x, w, b):
    x, w, b = x.copy(), w.copy(), b.copy()
    if case == "nan pixel":
        x[1, 3, 4, 0] = np.nan
    elif case in ("+inf pixel", "-inf pixel"):
        x[1, 3, 4, x.shape[-1] - 1] = np.inf if case[0] == "+" else -np.inf
        x[0, 0, 0, 0] = -x[1, 3, 4, x.shape[-1] - 1]  # and one of the other sign, in a corner
    elif case == "nan weight":  # the centre tap: XLA multiplies its zero padding by the
        w[1, 1, 0, 5] = np.nan    # others (0 * NaN at the border), torch and oneDNN skip it
    elif case == "inf bias":
        b[2] = np.inf
    elif case == "zero pre-activation":  # ReLU's derivative at 0: torch's 0 (jnp.maximum: 1/2)
        x[:], b[:] = 0, 0
    return x, w, b


CASES = ("nan pixel", "+inf pixel", "-inf pixel", "nan weight", "inf bias",
         "zero pre-activation")


@pytest.mark.parametrize("channels", [3, 16], ids=["scanned-3ch", "16ch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conv_relu_layer_keeps_nan_and_inf(dtype, channels):
    """conv1_1-like (3 input channels: oneDNN checks the inputs and runs its plain ReLU when every
    partial sum is finite) and wider (the NaN-keeping ReLU always): y, dx, dw, db on "auto" and
    "xla" against torch's relu(conv2d) on the same (rounded) values."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 7, 8, channels)).astype(np.float32)
    w0 = (rng.standard_normal((3, 3, channels, 8)) / np.sqrt(9 * channels)).astype(np.float32)
    b0 = rng.standard_normal(8).astype(np.float32) * 0.1
    g = rng.standard_normal((2, 7, 8, 8)).astype(np.float32)
    jdt = jnp.dtype(dtype)
    rnd = lambda a: np.asarray(jnp.asarray(a, jdt), np.float32)  # noqa: E731 - torch sees these
    rtol = F32_RTOL if dtype == "float32" else BF16_RTOL

    def layer(impl):
        def f(x, w, b):
            return onednn.conv(x, w, b, padding=((1, 1), (1, 1)), relu=True, impl=impl)
        return jax.jit(lambda x, w, b, g: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, x, w, b)))

    paths = {impl: layer(impl) for impl in ("auto", "xla")}
    hlo = paths["auto"].lower(*(jnp.asarray(a, jdt) for a in (x0, w0, b0, g))).compile()
    assert ("vgg_flax_conv" in hlo.as_text()) == onednn.cpu_supports(dtype)
    for case in CASES:
        x, w, b = (rnd(a) for a in _poisoned(case, x0, w0, b0))
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in
                      (x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), b))
        ty = F.relu(F.conv2d(tx, tw, tb, padding=1))
        ty.backward(torch.tensor(rnd(g).transpose(0, 3, 1, 2)))
        want = [ty.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
                tw.grad.numpy().transpose(2, 3, 1, 0), tb.grad.numpy()]
        with jax.default_matmul_precision("highest"):
            for impl, f in paths.items():
                got = f(*(jnp.asarray(a, jdt) for a in (x, w, b, g)))
                for name, a, ref in zip(("y", "dx", "dw", "db"), got, want):
                    assert_same(a, ref, rtol, f"{impl} {case} {name}")
        if case == "zero pre-activation":
            assert not np.asarray(got[3]).any()  # db: no gradient through a ReLU at 0
    # finite inputs: the fused ReLU is max(y, 0) to the bit (+0 where y <= 0), as it always was
    def conv(x, w, b, relu):
        return onednn.conv(x, w, b, padding=((1, 1), (1, 1)), relu=relu)
    x, w, b = (jnp.asarray(a, jdt) for a in (x0, w0, b0))
    fused = jax.jit(conv, static_argnums=3)(x, w, b, True)
    apart = jax.jit(lambda x, w, b: jnp.maximum(conv(x, w, b, False), 0))(x, w, b)
    assert np.asarray(fused).tobytes() == np.asarray(apart).tobytes()


# -- a whole VGG-11 (1/8 width) against torchvision's ------------------------------------------
TINY = dict(width=0.125, hidden_size=16, pool_size=(1, 1), num_classes=10)


def _torchvision_tiny():
    cfg = [v if v == "M" else scale(v, TINY["width"]) for v in tv.cfgs["A"]]
    torch.manual_seed(0)
    model = tv.VGG(tv.make_layers(cfg), num_classes=10, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(TINY["pool_size"])
    model.classifier = nn.Sequential(nn.Linear(cfg[-2], 16), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(16, 10))
    return randomize(model.eval(), 0)


MODEL_CASES = {
    "nan weight in conv3_1": lambda sd, x: sd["features.6.weight"].__setitem__((3, 2, 1, 1),
                                                                               np.nan),
    "nan pixel": lambda sd, x: x.__setitem__((1, 0, 10, 12), np.nan),
    "+inf pixel": lambda sd, x: x.__setitem__((1, 0, 10, 12), np.inf),
    "-inf pixel": lambda sd, x: x.__setitem__((1, 2, 20, 5), -np.inf),
}


@pytest.fixture(scope="module")
def model_results():
    """{case: (torch's logits and gradients, {impl: ours})}; gradients of sum(logits) with
    respect to every parameter (torch's state_dict names) and the input (NHWC)."""
    tm = _torchvision_tiny()
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fns = {}
    for impl in ("auto", "xla"):
        module = vgg_flax.create("vgg11", conv=impl, **TINY)
        f = lambda v, x, module=module: module.apply(v, x)  # noqa: E731
        fns[impl] = (jax.jit(f), jax.jit(jax.grad(lambda v, x, f=f: f(v, x).sum(), (0, 1))))
    out = {}
    for case, poison in MODEL_CASES.items():
        sd = {k: v.clone() for k, v in tm.state_dict().items()}
        x = x0.clone()
        poison(sd, x)
        tm.load_state_dict(sd)
        xt = x.clone().requires_grad_(True)
        tm.zero_grad()
        logits = tm(xt)
        logits.sum().backward()
        ref = (logits.detach().numpy(), {k: p.grad.numpy().copy() for k, p in
                                         tm.named_parameters()}, nhwc(xt.grad))
        variables = vgg_flax.from_torch(sd, "vgg11", **TINY)
        ours = {}
        with jax.default_matmul_precision("highest"):
            for impl, (apply, grad) in fns.items():
                gv, gx = grad(variables, jnp.asarray(nhwc(x)))
                ours[impl] = (np.asarray(apply(variables, nhwc(x))),
                              vgg_flax.to_torch(gv, "vgg11", as_numpy=True, **TINY),
                              np.asarray(gx))
        out[case] = (ref, ours)
    return out


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_logits_carry_nan_and_inf_as_torchvision(model_results, case):
    ref, ours = model_results[case]
    assert np.isnan(ref[0]).any()  # the case is one: torch's logits are NaN
    for impl, (logits, _, _) in ours.items():
        assert_same(logits, ref[0], 1e-4, f"{impl} logits")


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_gradients_agree_on_both_paths(model_results, case):
    """oneDNN's and XLA's convolutions give the same gradients, NaN and inf included."""
    _, ours = model_results[case]
    _, auto_grads, auto_dx = ours["auto"]
    _, xla_grads, xla_dx = ours["xla"]
    for k in xla_grads:
        assert_same(auto_grads[k], xla_grads[k], 1e-4, f"d{k}")
    assert_same(auto_dx, xla_dx, 1e-4, "dx")


def test_model_gradients_equal_torchvision(model_results):
    for case, (ref, ours) in model_results.items():
        for impl, (_, grads, dx) in ours.items():
            for k, want in ref[1].items():
                assert_same(grads[k], want, 1e-4, f"{case} {impl} d{k}")
            assert_same(dx, ref[2], 1e-4, f"{case} {impl} dx")


# -- CPUs without AVX-512 (oneDNN held back by ONEDNN_MAX_CPU_ISA) -------------------------------
OTHER_CPU = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from vgg_flax import onednn
    assert not onednn.cpu_supports("bfloat16")  # bf16 runs on XLA's convolution (round once)
    rng = np.random.default_rng(0)
    for channels in (3, 16):
        x = rng.standard_normal((2, 6, 7, channels)).astype(np.float32)
        x[1, 2, 3, 0], x[0, 4, 4, channels - 1], x[1, 0, 6, 1] = np.nan, np.inf, -np.inf
        w = rng.standard_normal((3, 3, channels, 8)).astype(np.float32) / 3
        b = rng.standard_normal(8).astype(np.float32)
        for dtype in ("float32", "bfloat16"):
            a = [jnp.asarray(v, dtype) for v in (x, w, b)]
            f = lambda impl: jax.jit(lambda x, w, b: jax.vjp(lambda *p: onednn.conv(
                *p, padding=((1, 1), (1, 1)), relu=True, impl=impl), x, w, b)[1](
                    jnp.ones((2, 6, 7, 8), dtype)) + (onednn.conv(
                        x, w, b, padding=((1, 1), (1, 1)), relu=True, impl=impl),))
            hlo = f("auto").lower(*a).compile().as_text()
            assert ("vgg_flax_conv" in hlo) == (dtype == "float32"), dtype
            with jax.default_matmul_precision("highest"):
                got, want = f("auto")(*a), f("xla")(*a)
            for g, r in zip(got, want):
                g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
                for where in (np.isnan, np.isposinf, np.isneginf):
                    assert (where(g) == where(r)).all(), (sys.argv[1], channels, dtype, where)
                ok = np.isfinite(r)
                tol = 1e-5 if dtype == "float32" else 2 ** -6
                assert np.abs(g[ok] - r[ok]).max() <= tol * np.abs(r[ok]).max(), (channels, dtype)
    print("ok", onednn.version())
""")


def test_cpus_without_avx512():
    """AVX2 (oneDNN's avx2 kernels for float32, XLA's convolution for bfloat16) and AVX (oneDNN's
    gemm-based kernels, whose ReLU post-op also turned -inf into NaN): the same NaN and inf."""
    procs = [subprocess.Popen([sys.executable, "-c", OTHER_CPU, isa], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa,
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
             for isa in ("AVX2", "AVX")]
    for isa, p in zip(("AVX2", "AVX"), procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("ok"), (isa, err[-3000:])
