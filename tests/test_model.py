"""The model library's API: construction, errors, taps, initialisation, save/load, NNX."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import vgg_flax
from torch_ref import TORCHVISION_NAMES, nhwc, torchvision_vgg
from vgg_flax.model import init_compiler_options

SMALL = dict(width=0.25, hidden_size=64, pool_size=(1, 1), num_classes=10)


@pytest.fixture(scope="module")
def small():
    """A VGG-11 at 1/4 width for 1-channel 32x32 images, and its variables."""
    model = vgg_flax.create("vgg11_bn", **SMALL)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 1)), jnp.float32)
    init = jax.jit(model.init, compiler_options=init_compiler_options())  # as the trainer does
    return model, init(jax.random.key(0), x), x


def test_names_classes_and_metadata():
    assert vgg_flax.list_models()[:8] == list(TORCHVISION_NAMES)
    assert {"vgg11_lrn", "vgg16_c", "vgg16_ssd"} <= set(vgg_flax.list_models())
    m = vgg_flax.VGG16(num_classes=10)
    assert isinstance(m, vgg_flax.VGG) and m.num_classes == 10 and m.cfg == vgg_flax.CFGS["D"]
    assert vgg_flax.VGG19_BN().batch_norm and not vgg_flax.VGG19().batch_norm
    # Each named class is written out by hand: its defaults must be its variant's row.
    from vgg_flax import registry
    assert set(registry.NAMED_CLASSES) == set(vgg_flax.list_models())
    for name, cls in registry.NAMED_CLASSES.items():
        assert getattr(vgg_flax, name.upper()) is cls and cls.__module__ == "vgg_flax.registry"
        built, made = cls(), vgg_flax.create(name)
        for f in dataclasses.fields(vgg_flax.VGG):
            if f.name not in ("parent", "name"):
                assert getattr(built, f.name) == getattr(made, f.name), (name, f.name)
    assert vgg_flax.imagenet_categories() == tuple(
        torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    for name in TORCHVISION_NAMES:
        w = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        meta = vgg_flax.metadata(name)
        assert meta["num_params"] == w.meta["num_params"]
        assert meta["acc1"] == w.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert meta["acc5"] == w.meta["_metrics"]["ImageNet-1K"]["acc@5"]
        assert meta["weights_url"] == w.url
        t = w.transforms()
        p = meta["preprocessing"]
        assert (p["resize_size"], p["crop_size"]) == (t.resize_size[0], t.crop_size[0])
        assert list(p["mean"]) == list(t.mean) and list(p["std"]) == list(t.std)
    ssd = torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.transforms()
    p = vgg_flax.metadata("vgg16_ssd")["preprocessing"]
    np.testing.assert_allclose(p["mean"], ssd.mean)
    np.testing.assert_allclose(p["std"], ssd.std)


def test_computed_metadata_of_our_variants():
    from vgg_flax.model import abstract_variables, count_macs
    for name in ("vgg11_lrn", "vgg16_c", "vgg16_ssd"):
        meta, model = vgg_flax.metadata(name), vgg_flax.create(name)
        n = sum(a.size for a in jax.tree.leaves(abstract_variables(model)["params"]))
        assert meta["num_params"] == n
        h, w, c = meta["input_size"]
        assert meta["gflops"] == pytest.approx(count_macs(model, (1, h, w, c)) / 1e9, abs=1e-3)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown VGG 'vgg17'.*vgg16_bn.*vgg16_ssd"):
        vgg_flax.create("vgg17")
    with pytest.raises(TypeError, match="unknown VGG field.*num_class"):
        vgg_flax.create("vgg16", num_class=10)


@pytest.mark.parametrize("shape,match", [
    ((32, 32, 3), "NHWC batch"),
    ((1, 31, 64, 3), "smaller than the 32x32 minimum"),
    ((1, 64, 16, 3), "smaller than the 32x32 minimum"),
])
def test_bad_input_fails_at_trace_time(shape, match):
    model = vgg_flax.create("vgg16")
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_integer_input_is_refused(small):
    model, variables, _ = small
    with pytest.raises(ValueError, match="float input.*preprocess"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1), jnp.uint8))


def test_small_variant_trains_and_infers(small):
    model, variables, x = small
    assert variables["params"]["conv1_1"]["kernel"].shape == (3, 3, 1, 16)
    assert variables["params"]["fc6"]["kernel"].shape == (128, 64)
    logits = model.apply(variables, x)
    assert logits.shape == (4, 10)
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)})
    assert out.shape == (4, 10)
    assert not np.allclose(updates["batch_stats"]["bn1_1"]["mean"], 0)
    # dropout is active in training and not in evaluation
    out2, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(out, out2)
    np.testing.assert_array_equal(logits, model.apply(variables, x))


def test_taps_stop_at_the_deepest_tap(small):
    model, variables, x = small
    shallow = {"params": {k: variables["params"][k] for k in ("conv1_1", "bn1_1")},
               "batch_stats": {"bn1_1": variables["batch_stats"]["bn1_1"]}}
    # Only conv1_1/bn1_1 exist: any deeper layer would fail to find its parameters.
    out = model.clone(taps=("relu1_1", "conv1_1")).apply(shallow, x)
    assert list(out) == ["relu1_1", "conv1_1"]
    np.testing.assert_array_equal(out["relu1_1"], jnp.maximum(
        model.clone(taps=("bn1_1",)).apply(shallow, x)["bn1_1"], 0))
    jaxpr = jax.make_jaxpr(lambda v, x: model.clone(taps=("pool2",)).apply(v, x))(variables, x)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # a convolution is vgg_flax's primitive (oneDNN on CPU, lax's convolution elsewhere)
    assert prims.count("vgg_flax_conv") == 2 and "dot_general" not in prims, prims
    with pytest.raises(ValueError, match="unknown tap.*relu1_3.*relu1_1"):
        model.clone(taps=("relu1_3",)).apply(variables, x)


def test_include_top_false_returns_pool5(small):
    model, variables, x = small
    feats = model.clone(include_top=False).apply(variables, x)
    np.testing.assert_array_equal(feats, model.clone(taps=("pool5",)).apply(variables, x)["pool5"])


def test_init_distribution_follows_torchvision():
    """Same initialisation law as torchvision: compare per-layer std and mean with its own init."""
    model = vgg_flax.create("vgg11_bn")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    torch.manual_seed(0)  # unseeded, a std fell outside 5% once (the draw, not the law)
    ref = vgg_flax.from_torch(torchvision.models.vgg11_bn(weights=None).state_dict(), "vgg11_bn")
    for layer, leaves in ref["params"].items():
        for leaf, r in leaves.items():
            ours, r = np.asarray(variables["params"][layer][leaf]), np.asarray(r)
            assert ours.shape == r.shape
            assert ours.std() == pytest.approx(r.std(), rel=0.05, abs=1e-6), (layer, leaf)
            # both centred where torchvision's law is: within 5 standard errors of its mean
            assert abs(ours.mean() - r.mean()) <= 5 * float(r.std()) / np.sqrt(r.size) + 1e-6
    ssd = jax.eval_shape(vgg_flax.create("vgg16_ssd").init, jax.random.key(0),
                         jnp.zeros((1, 300, 300, 3)))
    assert ssd["params"]["conv4_3_norm"]["scale"].shape == (512,)


def test_initialisers_are_flax_laws_bit_for_bit():
    """The kernel initialisers draw (kh kw, in, out) and reshape it (cheaper to compile), and
    the trainer compiles its init with ``init_compiler_options()`` (LLVM -O1 on CPU): the
    values must still be exactly those of the flax laws they stand for, compiled with XLA's
    defaults, in fp32 and bf16."""
    from vgg_flax.layers import conv_init, ssd_conv_init
    laws = [(conv_init, nn.initializers.variance_scaling(2.0, "fan_out", "normal")),
            (ssd_conv_init, nn.initializers.xavier_uniform())]
    shapes = [(3, 3, 5, 7), (1, 1, 6, 4)]  # each draw compiles its own sampler

    def draws(which, key):
        return [law[which](jax.random.fold_in(key, sum(s)), s, d) for law in laws for s in shapes
                for d in (jnp.float32, jnp.bfloat16)]

    key = jax.random.key(3)
    ours = jax.jit(lambda k: draws(0, k), compiler_options=init_compiler_options())(key)
    refs = jax.jit(lambda k: draws(1, k))(key)
    assert init_compiler_options() == {"xla_backend_optimization_level": 1}  # CPU here
    for a, ref in zip(ours, refs, strict=True):
        assert a.shape == ref.shape and a.dtype == ref.dtype
        assert float(jnp.abs(ref.astype(jnp.float32)).max()) > 0
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(ref, np.float32))


def test_ssd_l2norm_init_is_20():
    model = vgg_flax.create("vgg16_ssd", width=0.125, hidden_size=64)
    # jitted for the one leaf: XLA drops the other parameters' draws (eagerly each compiles)
    scale = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)))
                    ["params"]["conv4_3_norm"]["scale"])(jax.random.key(0))
    np.testing.assert_array_equal(scale, 20.0)


def test_bf16_compute_keeps_fp32_params(small):
    model, variables, x = small
    bf16 = model.clone(dtype=jnp.bfloat16)
    out = bf16.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    v = jax.eval_shape(bf16.init, jax.random.key(0), x)  # the dtypes (values: no matter)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    ref = model.apply(variables, x)
    assert np.abs(np.asarray(out, np.float32) - ref).max() <= 0.05 * np.abs(ref).max()


def test_adaptive_pool_matches_torch_on_uneven_bins():
    from vgg_flax.layers import adaptive_avg_pool
    x = torch.randn(2, 5, 13, 10)
    for out in [(7, 7), (3, 5), (13, 10), (1, 1)]:
        ref = nhwc(torch.nn.functional.adaptive_avg_pool2d(x, out))
        np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(nhwc(x)), out), ref,
                                   rtol=1e-6, atol=1e-6)


def test_weight_mismatch_names_the_real_variant():
    sd19 = torchvision_vgg("vgg19").state_dict()
    with pytest.raises(vgg_flax.WeightMismatchError,
                       match=r"look like vgg19 weights.*6 missing.*12 unexpected.*1 wrongly shaped"):
        vgg_flax.from_torch(sd19, "vgg16")
    sd_bn = torchvision_vgg("vgg11_bn").state_dict()
    with pytest.raises(vgg_flax.WeightMismatchError, match="look like vgg11_bn") as err:
        vgg_flax.from_torch(sd_bn, "vgg11")
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg and "wrongly shaped" in msg and "\n" not in msg
    assert vgg_flax.identify(sd_bn) == "vgg11_bn"


def test_ten_class_head_says_how():
    torch.manual_seed(0)
    tm = torchvision.models.vgg11(num_classes=10)
    with pytest.raises(vgg_flax.WeightMismatchError, match="10 classes: pass num_classes=10"):
        vgg_flax.from_torch(tm.state_dict(), "vgg11")
    v = vgg_flax.from_torch(tm.state_dict(), "vgg11", num_classes=10)
    assert v["params"]["fc8"]["kernel"].shape == (4096, 10)


def test_from_torch_keeps_or_casts_dtype():
    import ml_dtypes
    sd = {k: v.to(torch.bfloat16) for k, v in torchvision_vgg("vgg11").state_dict().items()}
    v = vgg_flax.from_torch(sd, "vgg11")
    assert v["params"]["conv1_1"]["kernel"].dtype == ml_dtypes.bfloat16
    assert vgg_flax.from_torch(sd, "vgg11", dtype=np.float32)["params"]["fc8"]["bias"].dtype == np.float32
    back = vgg_flax.to_torch(v, "vgg11")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], sd[k]) for k in sd)


def test_save_load_roundtrip(small, tmp_path):
    model, variables, x = small
    path = vgg_flax.save(tmp_path / "ckpt", variables, "vgg11_bn", module=model)
    with pytest.raises(FileExistsError, match="--force"):
        vgg_flax.save(tmp_path / "ckpt", variables, "vgg11_bn", module=model)
    loaded, v2 = vgg_flax.load(path)
    assert loaded == model
    jax.tree.map(np.testing.assert_array_equal, variables, v2)
    dense = vgg_flax.load(path, taps=("relu1_1",))[0]
    assert dense.taps == ("relu1_1",)
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "temporary directory left behind"
    with pytest.raises(FileNotFoundError, match="not a vgg_flax checkpoint"):
        vgg_flax.load(tmp_path)


def test_saved_fields_derive_from_the_dataclass():
    """Every VGG field is recorded by save except the explicit run-time choices: a changed value
    of each appears in the saved overrides and comes back; conv never does."""
    from vgg_flax import checkpoint
    fields = {f.name for f in dataclasses.fields(vgg_flax.VGG)}
    assert set(checkpoint.saved_fields()) == fields - checkpoint.EXCLUDED_FIELDS
    assert {"conv", "parent", "name"} <= checkpoint.EXCLUDED_FIELDS
    changed = dict(num_classes=7, include_top=False, dropout_rate=0.3, hidden_size=128,
                   width=0.5, pool_size=(2, 2), l2norm=True, bn_momentum=0.2, bn_epsilon=1e-3,
                   cfg=vgg_flax.CFGS["A"], batch_norm=True, head="ssd", lrn_size=3,
                   lrn_alpha=1e-3, lrn_beta=0.5, lrn_k=1.0, dtype=jnp.bfloat16,
                   param_dtype=jnp.bfloat16)
    assert set(changed) == set(checkpoint.saved_fields()), "a new VGG field: add it here"
    module = vgg_flax.create("vgg16", conv="xla", **changed)
    saved = checkpoint.module_overrides(module, "vgg16")
    assert set(saved) == set(changed)
    back = vgg_flax.create("vgg16", **checkpoint.overrides_from_json(saved))
    for k, v in changed.items():
        assert getattr(back, k) == v, k
    assert back.conv == "auto"


def test_nnx_module_has_the_same_function(small):
    from flax import nnx
    model, variables, x = small
    m = vgg_flax.to_nnx(model, variables)
    assert isinstance(m, nnx.Module)
    np.testing.assert_array_equal(m(x), model.apply(variables, x))
