"""Every JAX transformation on a whole VGG, on the fast convolutions and on XLA's.

conv="auto" is oneDNN on this CPU (test_fast_path_is_taken fails if it silently is not);
conv="xla" is ``lax.conv_general_dilated``, whose own JVP and transpose rules are JAX's, so the
cross-check test holds the oneDNN primitives' rules to lax's. Parameters and biases are random
and non-zero, inputs exercise both pools, ReLU's two sides and every layer kind of the net.
Tolerances: float32 at highest precision; identities hold to 1e-5 relative (summation order).
"""
import math
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vgg_flax
from vgg_flax import onednn

IMPLS = ["auto", "xla"]
RTOL = 1e-5


def randomize(variables, seed=0):
    """Every leaf random: kernels at He scale, biases and BN statistics visibly non-zero.
    (numpy: jax.random compiles a sampler per leaf shape, ~7 s for this tree.)"""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            v = rng.standard_normal(leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
        elif "var" in name:
            v = rng.uniform(0.5, 2.0, leaf.shape)
        else:
            v = rng.standard_normal(leaf.shape) * 0.1 + (1.0 if "scale" in name else 0.0)
        return jnp.asarray(v.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module")
def net():
    """A small VGG-11 (both 2x2 pools, fc6-fc8) with random non-zero parameters (every leaf is
    drawn, so the model's own initialiser is not run: only its shapes are needed)."""
    model = vgg_flax.create("vgg11", width=1 / 8, hidden_size=16, num_classes=4,
                            pool_size=(1, 1), dropout_rate=0.0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = randomize(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes))
    return model, variables["params"], x


def logits_fn(net, impl):
    model, _, _ = net
    model = model.clone(conv=impl)
    return lambda params, x: model.apply({"params": params}, x)


def loss_fn(net, impl):
    f = logits_fn(net, impl)
    labels = jnp.array([1, 3])
    return lambda params, x: optax.softmax_cross_entropy_with_integer_labels(
        f(params, x), labels).mean()


def like(tree, seed):
    """Normal values shaped like ``tree`` (numpy: no sampler to compile per tree shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)), tree)


def vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def close(a, b, rtol=RTOL, what=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(np.abs(y).max(), 1e-30)
        assert np.abs(x - y).max() <= rtol * scale, (what, np.abs(x - y).max(), scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_jvp_and_vjp_are_adjoint(net, impl):
    """<J v, u> = <v, J^T u> for the input and for every parameter."""
    _, params, x = net
    f = logits_fn(net, impl)
    with jax.default_matmul_precision("highest"):
        y, jvp = jax.jit(lambda p, x, dp, dx: jax.jvp(f, (p, x), (dp, dx)))(
            params, x, like(params, 2), like(x, 3))
        u = like(y, 4)
        dp, dx = jax.jit(lambda p, x, u: jax.vjp(f, p, x)[1](u))(params, x, u)
    lhs = jnp.vdot(jvp, u)
    rhs = vdot(dp, like(params, 2)) + jnp.vdot(dx, like(x, 3))
    assert abs(lhs - rhs) <= RTOL * (abs(lhs) + abs(rhs)), (lhs, rhs)


@pytest.mark.parametrize("impl", IMPLS)
def test_jacfwd_equals_jacrev_and_linearize_equals_jvp(net, impl):
    """Along three directions that move the input and every parameter at once."""
    _, params, x = net
    f = logits_fn(net, impl)
    dirs = [(like(params, 10 + i), like(x, 20 + i)) for i in range(3)]

    def g(z):
        p = jax.tree.map(lambda a, *d: a + sum(zi * di for zi, di in zip(z, d)), params,
                         *[d[0] for d in dirs])
        return f(p, x + sum(zi * d[1] for zi, d in zip(z, dirs)))

    z = jnp.zeros(3)
    with jax.default_matmul_precision("highest"):
        fwd = jax.jit(jax.jacfwd(g))(z)
        rev = jax.jit(jax.jacrev(g))(z)
        v = jnp.array([1.0, -2.0, 0.5])
        t = jax.jit(lambda z, v: jax.linearize(g, z)[1](v))(z, v)  # jitted: one compile, not
        t_jvp = jax.jit(lambda z, v: jax.jvp(g, (z,), (v,))[1])(z, v)  # one per eager op
    assert fwd.shape == (2, 4, 3)
    close(fwd, rev, what="jacfwd vs jacrev")
    close(t, t_jvp, what="linearize vs jvp")


@pytest.mark.parametrize("impl", IMPLS)
def test_hessian_vector_products(net, impl):
    """Forward-over-reverse and reverse-over-reverse HVPs agree, and <u, H v> = <v, H u>."""
    _, params, x = net
    loss = loss_fn(net, impl)
    grad = jax.grad(loss)
    v, u = like(params, 5), like(params, 6)
    fwd_rev = jax.jit(lambda p, v: jax.jvp(lambda p: grad(p, x), (p,), (v,))[1])
    rev_rev = jax.jit(lambda p, v: jax.grad(lambda p: vdot(grad(p, x), v))(p))
    with jax.default_matmul_precision("highest"):
        hv, hu = fwd_rev(params, v), fwd_rev(params, u)
        close(rev_rev(params, v), hv, rtol=1e-4, what="HVP modes")
    a, b = vdot(u, hv), vdot(v, hu)
    assert abs(a - b) <= 1e-4 * (abs(a) + abs(b)), (a, b)
    assert abs(a) > 1e-3  # the curvature is really there (ReLU nets: from the softmax)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_equals_a_loop(net, impl):
    """vmap of the forward, of jvp, and per-example gradients, against Python loops."""
    _, params, x = net
    f, loss = logits_fn(net, impl), loss_fn(net, impl)
    xs = jnp.stack([x, -x, 2 * x])
    dxs = like(xs, 7)
    # the loops run one example at a time through jitted functions (eagerly, every primitive
    # of the network and its derivative would compile on its own)
    one_jvp = lambda a, d: jax.jvp(lambda a: f(params, a), (a,), (d,))[1]  # noqa: E731
    f1, jvp1, grad1 = jax.jit(f), jax.jit(one_jvp), jax.jit(jax.grad(loss))
    with jax.default_matmul_precision("highest"):
        close(jax.jit(jax.vmap(f, (None, 0)))(params, xs),
              jnp.stack([f1(params, a) for a in xs]), what="vmap forward")
        close(jax.jit(jax.vmap(one_jvp))(xs, dxs),
              jnp.stack([jvp1(a, d) for a, d in zip(xs, dxs)]), what="vmap jvp")
        # per-example gradients: the weight gradient must not sum over the mapped axis
        per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(params, xs)
        for i, a in enumerate(xs):
            close(jax.tree.map(lambda g: g[i], per_example), grad1(params, a),
                  what=f"per-example grad {i}")


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_under_checkpoint_equals_grad(net, impl):
    _, params, x = net
    loss = loss_fn(net, impl)
    with jax.default_matmul_precision("highest"):
        plain = jax.jit(jax.grad(loss))(params, x)
        remat = jax.jit(jax.grad(jax.checkpoint(loss)))(params, x)
    close(remat, plain, rtol=1e-6, what="checkpoint")


def test_fast_path_agrees_with_xla_rules(net):
    """The oneDNN primitives' JVP/transpose rules give what lax's own rules give: value,
    gradient, JVP and HVP of the same function."""
    _, params, x = net
    v = like(params, 8)
    out = {}
    for impl in IMPLS:
        loss = loss_fn(net, impl)
        with jax.default_matmul_precision("highest"):
            out[impl] = jax.jit(lambda p: (
                jax.value_and_grad(loss)(p, x),
                jax.jvp(lambda p: loss(p, x), (p,), (v,))[1],
                jax.jvp(lambda p: jax.grad(loss)(p, x), (p,), (v,))[1]))(params)
    close(out["auto"], out["xla"], rtol=1e-4, what="auto vs xla")


def _onednn_expected() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def test_fast_path_is_taken(net):
    """On x86-64 Linux every convolution of forward, gradient, JVP and HVP runs on oneDNN: no
    XLA convolution is left in the compiled programs (a silent fallback fails here)."""
    if not _onednn_expected():
        assert not onednn.available()
        return
    _, params, x = net
    loss = loss_fn(net, "auto")
    v = like(params, 9)
    programs = {
        "forward": (jax.jit(logits_fn(net, "auto")), (params, x)),
        "grad": (jax.jit(jax.grad(loss)), (params, x)),
        "jvp": (jax.jit(lambda p, v: jax.jvp(lambda p: loss(p, x), (p,), (v,))), (params, v)),
        "hvp": (jax.jit(lambda p, v: jax.jvp(lambda p: jax.grad(loss)(p, x), (p,), (v,))),
                (params, v)),
    }
    for what, (fn, args) in programs.items():
        hlo = fn.lower(*args).compile().as_text()
        assert "vgg_flax_conv" in hlo, what
        assert " convolution(" not in hlo, what
    hlo = programs["grad"][0].lower(params, x).compile().as_text()
    # one fused weight-and-bias gradient per layer, and ReLU folded into each forward call
    assert hlo.count('custom_call_target="vgg_flax_conv_bwd_weights_bias"') == 8


def test_conv_choice_is_explicit(net, monkeypatch):
    model, params, x = net
    with pytest.raises(ValueError, match="VGG field conv .*must be .auto., .onednn. or .xla., got .cudnn."):
        model.clone(conv="cudnn").apply({"params": params}, x)
    # "onednn" is a requirement: where it cannot run, one line, not a silent fallback
    half = model.clone(conv="onednn", dtype=jnp.float16)
    with pytest.raises(ValueError, match="conv='onednn' cannot run.*float16"):
        half.apply({"params": params}, x)
    monkeypatch.setattr(onednn, "_load", lambda: (None, "the extension is not built here"))
    with pytest.raises(ValueError, match="not built here; use conv='auto'"):
        jax.jit(model.clone(conv="onednn").apply)({"params": params}, x)
    # ... while "auto" runs XLA's convolution there, with the same result
    with jax.default_matmul_precision("highest"):
        auto = jax.jit(model.clone(conv="auto").apply)({"params": params}, x)
        xla = jax.jit(model.clone(conv="xla").apply)({"params": params}, x)
    close(auto, xla, rtol=1e-6)


def test_precision_reaches_xla_convolutions(net):
    model, params, x = net
    text = jax.jit(model.clone(conv="xla", precision="highest").apply).lower(
        {"params": params}, x).as_text()
    assert text.count("precision HIGHEST") >= 2 * 8  # both operands of each convolution


@pytest.mark.parametrize("impl", IMPLS)
def test_pool_gradient_behind_a_fused_relu_equals_torch(impl):
    """relu(conv(x) + b) -> 2x2 max pool, gradients against torch's autograd.

    Guards the pool's derivative against an XLA:CPU in-place fusion hazard: when it read the
    windows through a reshape of x, XLA wrote x's cotangent over x's buffer while still reading
    it, and this gradient was wrong by up to 100% (3 -> 64 channels is a shape that triggered it).
    Ties: half the ReLU outputs are 0, so many windows are all zero.
    """
    import torch
    from vgg_flax.layers import max_pool_2x2
    rng = np.random.default_rng(4)
    x, r = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in [(2, 16, 16, 3), (2, 8, 8, 64)])
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 64), np.float32) * 0.3)
    b = jnp.asarray(rng.standard_normal((64,), np.float32) * 0.1)

    def f(w, b):
        y = onednn.conv(x, w, b, padding=((1, 1), (1, 1)), relu=True, impl=impl)
        return (max_pool_2x2(y) * r).sum()

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(f, argnums=(0, 1)))(w, b)
    t = lambda a, *perm: torch.tensor(np.asarray(a).transpose(*perm))  # noqa: E731
    wt, bt = t(w, 3, 2, 0, 1).requires_grad_(), t(b, 0).requires_grad_()
    y = torch.relu(torch.nn.functional.conv2d(t(x, 0, 3, 1, 2), wt, bt, padding=1))
    (torch.nn.functional.max_pool2d(y, 2) * t(r, 0, 3, 1, 2)).sum().backward()
    for g, ref in zip(got, (wt.grad.numpy().transpose(2, 3, 1, 0), bt.grad.numpy())):
        np.testing.assert_allclose(g, ref, rtol=0, atol=RTOL * np.abs(ref).max())
