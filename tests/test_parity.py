"""vgg_flax against torchvision itself: every variant, seeded random weights with every bias,
BN statistic and L2Norm scale non-zero (``torch_ref.randomize``).

Tolerance: max |flax - torch| <= 1e-4 * max |torch| over the logits (fp32, matmul precision
pinned to "highest"). Conversions must round-trip bit for bit. Every variant runs on the
default convolutions (oneDNN here); the taps (whole vgg16_bn, every layer), paper-variant and
SSD tests also run on XLA's (``conv_impl``), the path GPUs and TPUs take.

Every test of a whole model runs on both front ends (``front``): the Linen module and the native
NNX one (``vgg_flax.nnx``, holding the same weights through ``to_nnx``), at the same tolerance.
The NNX layers call the same convolution function as Linen's, so NNX runs on the default
convolutions only, and at one input size (the extra sizes exercise the shared adaptive pool).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import vgg_flax
import vgg_flax.nnx
from vgg_flax.weights import torch_entries
from torch_ref import (TORCHVISION_NAMES, nhwc, paper_vgg, ssd_backbone, ssd_backbone_state_dict,
                       torchvision_vgg)

RTOL = 1e-4
SIZES = [(224, 224), (256, 256), (224, 320)]  # 256: overlapping 8->7 bins; 320: uneven 10->7


PARITY_TABLE = []  # (what, max abs diff, relative diff): printed at the end of the run

FRONTS = ["linen", "nnx"]
# (front end, convolution) for the tests that also run on XLA's convolutions: the NNX layers
# call the same layers.conv as Linen's, so NNX x XLA would test nothing Linen x XLA does not.
FRONT_CONV = [("linen", "auto"), ("linen", "xla"), ("nnx", "auto")]


def runner(front, module, variables, train=False, jit=True):
    """``x -> (output, batch_stats after the call or None)`` of Linen ``module`` holding
    ``variables`` on front end ``front``: Linen's ``apply`` (``mutable`` batch_stats in
    training), or the native NNX model ``to_nnx`` builds (``model.train()`` in training)."""
    if front == "linen":
        if not train:
            apply = jax.jit(module.apply) if jit else module.apply
            return lambda x: (apply(variables, x), None)
        apply = functools.partial(module.apply, train=True, mutable=["batch_stats"])
        apply = jax.jit(apply) if jit else apply

        def run(x):
            out, updates = apply(variables, x)
            return out, updates["batch_stats"]
        return run
    model = vgg_flax.nnx.to_nnx(module, variables)
    if train:
        model.train()
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))

    def run(x):
        out = call(model, x)
        return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) or None
    return run


def assert_close(out, ref, what):
    # In the arrays' own float32: |a - b| of two float32s is exact when they are within 2x of
    # each other (Sterbenz) and otherwise within 2^-24 of itself, so the measured error is
    # float64's to 6e-8 of its value. (float64 copies of fc6's gradient took 8 s per test.)
    dtype = np.result_type(np.asarray(out).dtype, np.asarray(ref).dtype, np.float32)
    out, ref = np.asarray(out, dtype), np.asarray(ref, dtype)
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    diff = np.abs(out - ref).max()
    err = diff / np.abs(ref).max()
    PARITY_TABLE.append((what, diff, err))
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL}"


def assert_bit_exact(sd, back):
    assert list(back) == [k for k in sd], "to_torch keys differ from torch's state_dict"
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


PAPER_CFGS = {"vgg11_lrn": "A-LRN", "vgg16_c": "C"}


@functools.lru_cache(maxsize=1)
def checked_conversion(name, seed=0):
    """(reference torch model, its state_dict, ``from_torch`` of it) for variant ``name``, the
    conversion checked once: bit for bit back through ``to_torch``, and its parameter count.

    A variant's tests on both front ends and both convolutions run one after another and share
    it (the last one is kept, ~0.5 GB at full size): converting and checking a full-size VGG is
    ~3 s of copying that gives the same answer every time. The parity tests of each variant
    check the torch model's own parameter count against ``metadata`` too."""
    if name == "vgg16_ssd":
        tm = ssd_backbone(seed)
        sd = ssd_backbone_state_dict(tm)
    else:
        tm = paper_vgg(PAPER_CFGS[name], seed) if name in PAPER_CFGS else torchvision_vgg(name, seed)
        sd = tm.state_dict()
    variables = vgg_flax.from_torch(sd, name)
    assert_bit_exact(sd, vgg_flax.to_torch(variables, name))
    assert (sum(v.size for v in jax.tree.leaves(variables["params"]))
            == vgg_flax.metadata(name)["num_params"])
    return tm, sd, variables


@pytest.fixture(scope="module", autouse=True)
def _drop_the_kept_conversion():
    yield
    checked_conversion.cache_clear()


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_parity(name, front):
    tm, _, variables = checked_conversion(name)
    assert sum(p.numel() for p in tm.parameters()) == vgg_flax.metadata(name)["num_params"]

    model = vgg_flax.create(name)
    # plain jit (nnx.jit for NNX), as a user runs it: speed never loosens the tolerance
    apply = runner(front, model, variables)
    g = torch.Generator().manual_seed(1)
    # Every variant at 224x224; the other sizes exercise the adaptive pool before fc6 (bins of
    # 8x8 and 7x10 maps), which no variant changes: vgg16 and vgg16_bn cover them (CI's time).
    sizes = SIZES if name in ("vgg16", "vgg16_bn") and front == "linen" else SIZES[:1]
    with jax.default_matmul_precision("highest"):
        for h, w in sizes:
            x = torch.randn(2, 3, h, w, generator=g)
            with torch.no_grad():
                ref = tm(x).numpy()
            assert_close(apply(nhwc(x))[0], ref, f"{front} {name} {h}x{w}")

        if "_bn" in name:
            # One training-mode forward: batch statistics and torch's running-stat update
            # (momentum 0.1, unbiased variance) must match.
            x = torch.randn(4, 3, 64, 64, generator=g)
            # A training forward changes only the buffers (running stats, batch counts): those
            # are saved and restored, not the whole (cached) model.
            buffers = dict(tm.named_buffers())
            saved = {k: v.clone() for k, v in buffers.items()}
            try:
                tm.features.train()
                with torch.no_grad():
                    feats_ref = tm.features(x)
                running = {k: v.clone() for k, v in buffers.items()}
            finally:
                for k, v in saved.items():
                    buffers[k].copy_(v)
                tm.eval()
            # jitted: one program, not one per op
            feats, updates = runner(front, model.clone(taps=("pool5",)), variables,
                                    train=True)(nhwc(x))
            assert_close(feats["pool5"], nhwc(feats_ref), f"{front} {name} train-mode features")
            # the running stats through the converter's name table (checked bit for bit above)
            entries = [e for e in torch_entries(model) if e.collection == "batch_stats"]
            assert {e.torch_key for e in entries} == {k for k in running if "running" in k}
            moved = 0
            for e in entries:
                layer, leaf = e.path
                np.testing.assert_allclose(np.asarray(updates[layer][leaf]),
                                           running[e.torch_key].numpy(), rtol=1e-5, atol=1e-6,
                                           err_msg=e.torch_key)
                moved += not torch.equal(running[e.torch_key], saved[e.torch_key])
            assert moved > 0, "the training forward did not update the running statistics"


@pytest.mark.parametrize("front,conv_impl", FRONT_CONV)
def test_taps_equal_torchvision_intermediates(front, conv_impl):
    name = "vgg16_bn"
    tm, _, variables = checked_conversion(name)
    model = vgg_flax.create(name, conv=conv_impl)
    names = model.tap_names()
    # torchvision's Sequential indices, in the same order as our layer names
    feature_names = [layer.name for layer in model.layers()[: len(tm.features)]]
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    ref = {}
    with torch.no_grad():
        h = x
        for layer_name, layer in zip(feature_names, tm.features):
            h = layer(h)
            ref[layer_name] = nhwc(h)
        h = torch.flatten(tm.avgpool(h), 1)
        for layer_name, layer in zip(["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"],
                                     tm.classifier):
            h = layer(h)
            ref[layer_name] = h.numpy().copy()
    assert "drop6" not in names and set(names) <= set(ref)
    with jax.default_matmul_precision("highest"):
        # eager: dict order kept
        out, _ = runner(front, model.clone(taps=tuple(names)), variables, jit=False)(nhwc(x))
    assert list(out) == names
    for n in names:
        assert_close(out[n], ref[n], f"{front} {conv_impl} tap {n}")
    # logits without taps are the last tap
    with jax.default_matmul_precision("highest"):
        assert_close(runner(front, model, variables, jit=False)(nhwc(x))[0], ref["fc8"],
                     f"{front} {conv_impl} {name} logits")


@pytest.mark.parametrize("front,conv_impl", FRONT_CONV)
@pytest.mark.parametrize("name,cfg", [("vgg11_lrn", "A-LRN"), ("vgg16_c", "C")])
def test_paper_variants(name, cfg, front, conv_impl):
    assert PAPER_CFGS[name] == cfg
    tm, _, variables = checked_conversion(name)
    assert sum(p.numel() for p in tm.parameters()) == vgg_flax.metadata(name)["num_params"]
    x = torch.randn(2, 3, 224, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tm(x).numpy()
    with jax.default_matmul_precision("highest"):
        assert_close(runner(front, vgg_flax.create(name, conv=conv_impl), variables)(nhwc(x))[0],
                     ref, f"{front} {conv_impl} {name}")


def test_lrn_is_krizhevskys_formula():
    """torch's LocalResponseNorm with our parameters is b = a / (2 + 1e-4 sum_{5} a^2)^0.75."""
    from vgg_flax.layers import local_response_norm
    a = np.random.default_rng(0).normal(size=(1, 4, 4, 9)).astype(np.float32) * 30
    padded = np.pad(a.astype(np.float64) ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window = sum(padded[..., i:i + 9] for i in range(5))
    expected = a / (2 + 1e-4 * window) ** 0.75
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    np.testing.assert_allclose(nhwc(torch_lrn(torch.from_numpy(a).permute(0, 3, 1, 2))),
                               expected, rtol=1e-5)
    np.testing.assert_allclose(local_response_norm(jnp.asarray(a)), expected, rtol=1e-5)


@pytest.mark.parametrize("front,conv_impl", FRONT_CONV)
def test_ssd_backbone_against_torchvision_ssd(front, conv_impl):
    tm, sd, variables = checked_conversion("vgg16_ssd")
    assert sum(v.numel() for v in sd.values()) == vgg_flax.metadata("vgg16_ssd")["num_params"]
    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tm(x)
        relu4_3 = tm.features(x)
    model = vgg_flax.create("vgg16_ssd", taps=("relu4_3", "conv4_3_norm", "relu7"), conv=conv_impl)
    with jax.default_matmul_precision("highest"):
        out, _ = runner(front, model, variables)(nhwc(x))
    assert out["conv4_3_norm"].shape == (1, 38, 38, 512)  # ceil-mode pool3: 75 -> 38
    assert out["relu7"].shape == (1, 19, 19, 1024)
    what = f"{front} {conv_impl} ssd"
    assert_close(out["relu4_3"], nhwc(relu4_3), f"{what} relu4_3 (before L2Norm)")
    assert_close(out["conv4_3_norm"], nhwc(ref["0"]), f"{what} conv4_3 L2Norm")
    assert_close(out["relu7"], nhwc(ref["1"]), f"{what} relu7")


def _valid_taps_1d(n, k, p, d):
    """Kernel taps that land inside an input of length n, summed over the output positions."""
    out = n + 2 * p - d * (k - 1)
    return sum(sum(0 <= o - p + d * j < n for j in range(k)) for o in range(out))


GFLOPS_RTOL = 5e-4  # torchvision's figure has 4 significant digits; measured agreement ~4e-5


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_gflops_match_torchvision(name):
    """count_macs follows torchvision's convention (every tap), within 5e-4 relative; leaving out
    the classifier (fc6-fc8, 124M MACs) would miss by more than 10x that on every variant.

    XLA's cost analysis counts only taps inside the image, and also counts the elementwise
    work: per conv output element the bias add and the ReLU (1 flop each), a share of the max
    pool, and with BatchNorm its scale and shift (2 more). So (XLA flops - 2 x (torchvision's
    MACs - the taps on zero padding)) / conv output elements must lie in [2, 3] ([4, 5] with BN);
    measured 2.3-2.6 (4.3-4.6). A missing fc layer makes it negative (-33 without the
    classifier). Geometry comes from torchvision's own modules, built on the meta device.
    (With XLA's convolutions: XLA counts nothing inside the oneDNN custom calls.)"""
    import torchvision
    from vgg_flax.model import abstract_variables, count_macs
    tv_gflops = getattr(torchvision.models, f"{name.upper()}_Weights").IMAGENET1K_V1.meta["_ops"]
    model = vgg_flax.create(name, conv="xla")
    assert abs(count_macs(model, (1, 224, 224, 3)) / 1e9 - tv_gflops) <= GFLOPS_RTOL * tv_gflops
    assert vgg_flax.metadata(name)["gflops"] == tv_gflops

    with torch.device("meta"):
        tv = torchvision.models.get_model(name)
    fc_macs = sum(m.in_features * m.out_features for m in tv.classifier
                  if isinstance(m, torch.nn.Linear))
    assert fc_macs > 10 * GFLOPS_RTOL * tv_gflops * 1e9, "the tolerance cannot see the classifier"
    padding_macs, size, conv_outputs = 0, 224, 0
    for m in tv.features:
        if isinstance(m, torch.nn.MaxPool2d):
            size //= 2
        elif isinstance(m, torch.nn.Conv2d):
            k, p, d = m.kernel_size[0], m.padding[0], m.dilation[0]
            full = (size + 2 * p - d * (k - 1)) ** 2 * k * k
            padding_macs += (full - _valid_taps_1d(size, k, p, d) ** 2) * m.in_channels * m.out_channels
            conv_outputs += size * size * m.out_channels
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    xla = jax.jit(model.apply).lower(abstract_variables(model), x).compile().cost_analysis()["flops"]
    expected = tv_gflops * 1e9 - padding_macs
    per_output = (xla - 2 * expected) / conv_outputs
    low = 4 if "_bn" in name else 2
    assert low <= per_output <= low + 1, (name, per_output, xla / 2e9, expected / 1e9)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_forward_and_gradient_equal_torch(ceil_mode, dtype):
    """The reshape pool and its custom gradient against torch's max_pool2d, bit for bit.

    Small integers after a ReLU make most windows tie (all zeros, or repeated values): torch
    sends the gradient to the first maximum in row-major window order, and so must we.
    """
    from vgg_flax.layers import max_pool_2x2
    g = torch.Generator().manual_seed(0)
    tdtype = torch.float32 if dtype == jnp.float32 else torch.bfloat16
    for h, w in [(8, 8), (7, 9), (5, 6), (1, 3)]:
        if (h < 2 or w < 2) and not ceil_mode:
            continue
        x = torch.randint(-2, 3, (2, 3, h, w), generator=g).to(tdtype).relu().requires_grad_()
        y = torch.nn.functional.max_pool2d(x, 2, 2, ceil_mode=ceil_mode)
        dy = torch.randn(y.shape, generator=g).to(tdtype)
        y.backward(dy)
        out, vjp = jax.vjp(lambda a: max_pool_2x2(a, ceil_mode), jnp.asarray(nhwc(x.detach().float()), dtype))
        (dx,) = vjp(jnp.asarray(nhwc(dy.float()), dtype))
        np.testing.assert_array_equal(np.asarray(out, np.float32), nhwc(y.detach().float()))
        np.testing.assert_array_equal(np.asarray(dx, np.float32), nhwc(x.grad.float()))


@pytest.mark.parametrize("front,conv_impl", FRONT_CONV)
def test_training_gradients_equal_torchvision(front, conv_impl):
    """d(loss)/d(every parameter) of a training-mode step equals torchvision's autograd.

    vgg11_bn in train mode (batch statistics), dropout off so both sides compute the same
    function; loss = sum(logits * fixed weights). Tolerance per tensor: max |diff| <= 1e-4 *
    max |torch grad|, matmul precision "highest".
    """
    name = "vgg11_bn"
    tm, _, variables = checked_conversion(name, seed=3)
    for m in tm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tm.train()
    model = vgg_flax.create(name, dropout_rate=0.0, conv=conv_impl)
    # Seed 7: no fc6/fc7 pre-activation lies within 5e-4 of zero. With batch 2, one unit whose
    # pre-activation rounds to the other side of 0 (seed 2 has one at -3.3e-6) flips its ReLU
    # mask and moves a whole column of fc7's gradient by ~4%: a tie in the input, not a fault
    # of either side, which differently ordered (and equally correct) sums trip at random.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 64, generator=g)
    wts = torch.randn(2, 1000, generator=g)
    tm.zero_grad(set_to_none=True)  # the reference model is cached: no gradients from a previous run
    pre = []
    hooks = [tm.classifier[i].register_forward_hook(lambda m, i, o: pre.append(o.detach().clone()))
             for i in (0, 3)]  # fc6, fc7 (cloned: the in-place ReLU that follows overwrites them)
    (tm(x) * wts).sum().backward()
    for h in hooks:
        h.remove()
    assert min(float(p.abs().min()) for p in pre) > 5e-4, "test input has a ReLU tie: change the seed"
    ref = vgg_flax.from_torch({k: (p.grad if p.grad is not None else p)
                               for k, p in {**dict(tm.named_buffers()),
                                            **dict(tm.named_parameters())}.items()}, name)

    xs, ws = jnp.asarray(nhwc(x)), jnp.asarray(wts.numpy())

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, xs,
                                train=True, mutable=["batch_stats"])
        return (logits * ws).sum()

    with jax.default_matmul_precision("highest"):
        if front == "linen":
            grads = jax.jit(jax.grad(loss))(variables["params"])
        else:
            m = vgg_flax.nnx.to_nnx(model, variables)
            m.train()
            grads = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: (m(xs) * ws).sum()))(m))
    assert set(grads) == set(variables["params"])
    for layer, got in grads.items():
        for leaf, g_ in got.items():
            what = f"{front} {conv_impl} {name} grad {layer}.{leaf}"
            if layer.startswith("conv") and leaf == "bias":
                # A bias followed by training-mode BN is cancelled by the mean subtraction:
                # its true gradient is 0, and both sides return rounding noise around it.
                scale = np.abs(np.asarray(ref["params"][layer]["kernel"])).max()
                assert np.abs(np.asarray(g_)).max() <= RTOL * scale, what
                continue
            assert_close(g_, ref["params"][layer][leaf], what)


BF16_RTOL = 3e-2  # bf16 keeps 8 bits of mantissa; 11 layers of rounding, measured ~1e-2
BF16_MIN_COSINE = 0.999


def test_bf16_matches_torch_autocast():
    """dtype=bfloat16 against torch's CPU autocast to bfloat16 (its mixed-precision recipe) on
    vgg11_bn with random non-zero biases and BN statistics, at 64x64. Both are compared with
    the fp32 reference too: ours must be within BF16_RTOL of torch's bf16 output (max abs diff
    over max |ref|), cosine >= 0.999, and no further from fp32 than twice torch's own error."""
    name = "vgg11_bn"
    tm, _, variables = checked_conversion(name)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fp32 = tm(x).double().numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tm(x)
    assert autocast.dtype == torch.bfloat16
    autocast = autocast.double().numpy()
    ours = jax.jit(vgg_flax.create(name, dtype=jnp.bfloat16).apply)(variables, nhwc(x))
    assert ours.dtype == jnp.bfloat16
    ours = np.asarray(ours, np.float64)

    def rel(a, b):
        return np.abs(a - b).max() / np.abs(b).max()

    cosine = float((ours * autocast).sum() / np.linalg.norm(ours) / np.linalg.norm(autocast))
    PARITY_TABLE.append((f"{name} bf16 vs torch autocast", np.abs(ours - autocast).max(),
                         rel(ours, autocast)))
    print(f"\nbf16 vs autocast: relative {rel(ours, autocast):.2e}, cosine {cosine:.6f}; "
          f"vs fp32: ours {rel(ours, fp32):.2e}, torch {rel(autocast, fp32):.2e}")
    assert rel(ours, autocast) <= BF16_RTOL
    assert cosine >= BF16_MIN_COSINE
    assert rel(ours, fp32) <= 2 * rel(autocast, fp32)
