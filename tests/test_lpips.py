"""vgg_flax.lpips against the lpips package (net='vgg', v0.1), and vgg_flax.losses against torch.

lpips' own random trunk (``pnet_rand=True``, seeded, biases made non-zero) with its published
linear weights; 64x64 images keep it fast (uint8 images, and 16x16 and 24x40 ones, too).
Forward within 1e-5 relative (of the largest value); input gradients compared with lpips run in
float64: ours no further from it than torch float32.
"""
import copy
import os

import jax
import jax.numpy as jnp
import lpips as LP
import numpy as np
import pytest
import torch

from vgg_flax import losses, lpips, weights

RTOL = 1e-5


@pytest.fixture(scope="session")
def reference():
    torch.manual_seed(0)
    ref = LP.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for name, p in ref.net.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    # lpips' slices hold torchvision vgg16.features' modules under their own indices
    trunk = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    params = lpips.params(weights.from_torch(trunk, "vgg16", include_top=False))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    return ref, params, x, y


def _nchw(a, dtype=torch.float32):
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2)).to(dtype)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_shipped_linear_weights_are_the_packages():
    sd = torch.load(os.path.join(os.path.dirname(LP.__file__), "weights", "v0.1", "vgg.pth"),
                    map_location="cpu", weights_only=True)
    ours = lpips.linear_weights()
    assert len(sd) == len(ours) == 5
    for k, layer in enumerate(lpips.LAYERS):
        np.testing.assert_array_equal(ours[layer], sd[f"lin{k}.model.1.weight"].numpy().ravel())


@pytest.mark.parametrize("spatial", [False, True])
def test_distance_equals_lpips(reference, spatial):
    ref, params, x, y = reference
    ref = copy.copy(ref)
    ref.spatial = spatial
    with torch.no_grad():
        want = ref(_nchw(x), _nchw(y)).numpy()
        # inputs in [0, 1] with normalize=True, as lpips' flag
        want01 = ref(_nchw((x + 1) / 2), _nchw((y + 1) / 2), normalize=True).numpy()
    want = want.reshape(want.shape[0], *want.shape[2:]) if spatial else want.reshape(-1)

    @jax.jit  # one program (compiling VGG-16 dominates this test)
    def run(x, y):
        d = lpips.distance(params, x, y, spatial=spatial)
        # per-image: vmapped over single pairs, the same distances
        one = jax.vmap(lambda a, b: lpips.distance(params, a[None], b[None], spatial=spatial)[0])(x, y)
        d01 = lpips.distance(params, (x + 1) / 2, (y + 1) / 2, spatial=spatial, normalize=True)
        return d, one, d01
    with jax.default_matmul_precision("highest"):
        got, one, got01 = run(x, y)
    assert got.shape == want.shape
    assert _rel(got, want) < RTOL  # measured 7e-8 (mean), 9e-7 (spatial)
    assert _rel(one, want) < RTOL
    assert _rel(got01, want01.reshape(want.shape)) < RTOL


def test_uint8_images_are_0_255_as_lpips_im2tensor(reference):
    """uint8, what images load as, means [0, 255] (lpips.im2tensor: x / 127.5 - 1) with or
    without normalize. It gave exactly 0: the constants were cast to uint8."""
    ref, params, x, y = reference
    a, b = (np.round((v[:2] + 1) * 127.5).astype(np.uint8) for v in (x, y))
    with torch.no_grad():
        want = ref(*(torch.cat([LP.im2tensor(i) for i in v]) for v in (a, b))).numpy().reshape(-1)

    @jax.jit
    def run(a, b):
        return (lpips.distance(params, a, b), lpips.distance(params, a, b, normalize=True),
                lpips.distance(params, a / 255, b / 255, normalize=True))
    with jax.default_matmul_precision("highest"):
        got, got_normalize, floats = run(a, b)
    assert _rel(got, want) < RTOL
    np.testing.assert_array_equal(got, got_normalize)
    assert _rel(floats, want) < RTOL
    with pytest.raises(ValueError, match="unsigned-integer ones .*got int32; cast to float"):
        lpips.distance(params, a.astype(np.int32), b.astype(np.int32))


def test_images_down_to_16x16_as_lpips(reference):
    """lpips computes any size its four pools before relu5_3 take (16x16 and up); pool5's 32x32
    minimum, which LPIPS never runs, does not apply. 16x16 (1x1 at relu5_3) and 24x40 (1x2 after
    floor pools; and its spatial map, upsampled from there)."""
    ref, params, x, y = reference
    pairs = [tuple(v[:2, :h, -w:] for v in (x, y)) for h, w in ((16, 16), (24, 40))]
    spatial = copy.copy(ref)
    spatial.spatial = True
    with torch.no_grad():
        want = [ref(_nchw(a), _nchw(b)).numpy().reshape(-1) for a, b in pairs]
        want_map = spatial(*map(_nchw, pairs[1])).numpy()[:, 0]

    @jax.jit
    def run(pairs):
        return ([lpips.distance(params, a, b) for a, b in pairs],
                lpips.distance(params, *pairs[1], spatial=True))
    with jax.default_matmul_precision("highest"):
        got, got_map = run(pairs)
    for g, w in zip(got, want):
        assert _rel(g, w) < RTOL
    assert got_map.shape == want_map.shape == (2, 24, 40)
    assert _rel(got_map, want_map) < RTOL
    with pytest.raises(ValueError, match="at least 16x16 .*got 15x40; resize"):
        lpips.distance(params, pairs[1][0][:, :15], pairs[1][1][:, :15])


def test_gradient_no_further_from_float64_than_torch_float32(reference):
    ref, params, x, y = reference

    def torch_grad(model, dtype):
        xt = _nchw(x, dtype).requires_grad_(True)
        model(xt, _nchw(y, dtype)).sum().backward()
        return xt.grad.numpy().transpose(0, 2, 3, 1).astype(np.float64)

    g64 = torch_grad(copy.deepcopy(ref).double(), torch.float64)
    g32 = torch_grad(ref, torch.float32)

    def dist(g):
        return np.linalg.norm(g - g64) / np.linalg.norm(g64)
    # XLA's convolutions: oneDNN's ("auto" on CPU) measured 1.07e-5 against torch's 1.05e-5 here
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(jax.grad(lambda a: lpips.distance(params, a, y, conv="xla").sum()))(x)
    assert np.isfinite(np.asarray(ours)).all()
    assert dist(np.asarray(ours, np.float64)) <= dist(g32), (dist(np.asarray(ours)), dist(g32))


def test_default_trunk_is_pretrained_vgg16(reference, monkeypatch):
    """lpips.params() takes vgg_flax.pretrained("vgg16")'s features (its sources are tested in
    test_pretrained.py); the classifier is never kept."""
    import importlib
    P = importlib.import_module("vgg_flax.published")
    calls = []

    def fake(name, **kw):
        calls.append((name, kw))
        return None, {"params": dict(reference[1]["trunk"]["params"], fc6={"kernel": 0})}
    monkeypatch.setattr(P, "pretrained", fake)
    p = lpips.params(cache_dir="somewhere")
    assert calls == [("vgg16", {"include_top": False, "cache_dir": "somewhere", "progress": True})]
    assert set(p["trunk"]["params"]) == set(reference[1]["trunk"]["params"])


def test_params_want_vgg16_variables():
    with pytest.raises(ValueError, match="trunk variables lack conv5_1, conv5_2, conv5_3"):
        lpips.params({"params": {f"conv{b}_{i}": {} for b in (1, 2, 3, 4) for i in (1, 2, 3)}})
    with pytest.raises(ValueError, match=r"two \(N, H, W, 3\) batches"):
        lpips.distance({}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 3)))


# -- Gatys et al. ------------------------------------------------------------------------------
def _torch_gatys(feats, content, style, alpha, beta):
    """The paper's eqs. 1-7 written out in torch (unnormalised Gram, 1/(4 N^2 M^2))."""
    def g(f):  # (N, C, H, W) -> (N, C, C), unnormalised
        n, c, h, w = f.shape
        m = f.reshape(n, c, h * w)
        return m @ m.transpose(1, 2)
    total_c = sum(0.5 * ((feats[l] - content[l]) ** 2).sum(dim=(1, 2, 3)) for l in losses.CONTENT_LAYERS)
    total_s = 0
    for l in losses.STYLE_LAYERS:
        _, c, h, w = feats[l].shape
        e = ((g(feats[l]) - g(style[l])) ** 2).sum(dim=(1, 2)) / (4 * c ** 2 * (h * w) ** 2)
        total_s = total_s + e / len(losses.STYLE_LAYERS)
    return alpha * total_c + beta * total_s


def test_gatys_loss_and_gradient_equal_torch():
    rng = np.random.default_rng(1)
    shapes = {"relu1_1": (16, 16, 8), "relu2_1": (8, 8, 16), "relu3_1": (4, 4, 32),
              "relu4_1": (2, 2, 64), "relu4_2": (2, 2, 64), "relu5_1": (1, 1, 64)}

    def sample(n):
        return {k: np.maximum(rng.standard_normal((n,) + s), 0).astype(np.float32)
                for k, s in shapes.items()}
    feats, content, style = sample(2), sample(2), sample(1)
    target = losses.targets(content, style)

    def ours(f):
        return losses.gatys(f, target, alpha=1.0, beta=1e3)
    got = np.asarray(jax.jit(ours)(feats))
    grads = jax.jit(jax.grad(lambda f: ours(f).sum()))(feats)

    tt = {k: _nchw(v).requires_grad_(True) for k, v in feats.items()}
    want = _torch_gatys(tt, {k: _nchw(v) for k, v in content.items()},
                        {k: _nchw(v) for k, v in style.items()}, 1.0, 1e3)
    want.sum().backward()
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(grads[k]),
                                   tt[k].grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-7)
