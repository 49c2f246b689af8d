"""vgg_flax.nnx: the native NNX VGG against the Linen one (its parity against torchvision is in
test_parity.py, on the same parametrized tests as Linen's).

One tiny vgg11_bn (BatchNorm and dropout both present) at 32x32, built once per module.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vgg_flax
import vgg_flax.nnx as vn
from vgg_flax import arch, registry
from vgg_flax.model import abstract_variables
from vgg_flax.weights import WeightMismatchError

TINY = dict(width=0.125, hidden_size=32, pool_size=(1, 1), num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    """(NNX model, its Linen module and variables, an input batch)."""
    model = vn.create("vgg11_bn", rngs=nnx.Rngs(0), **TINY)
    module, variables = vn.to_linen(model)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    return model, module, variables, x


def shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


@pytest.mark.parametrize("name", list(arch.VARIANTS))
def test_every_variant_has_linens_tree_and_class(name):
    """The state of every full-size variant (built abstractly) is Linen init's tree, leaf for
    leaf; create(name) is the named class of Linen's name."""
    model = nnx.eval_shape(lambda: vn.create(name))
    linen_cls = registry.NAMED_CLASSES[name]
    assert type(model) is vn.NAMED_CLASSES[name] is getattr(vn, linen_cls.__name__)
    assert model.fields() == {k: getattr(linen_cls(), k) for k in vn.FIELD_DEFAULTS}
    _, variables = vn.to_linen(model)
    assert shapes(variables) == shapes(abstract_variables(vgg_flax.create(name)))
    # layers are attributes named after the paper
    assert isinstance(model.conv1_1, vn.Conv)
    assert isinstance(getattr(model, "fc8" if name != "vgg16_ssd" else "conv7"), (vn.FC, vn.Conv))
    if name == "vgg16_ssd":
        assert isinstance(model.conv4_3_norm, vn.L2Norm)
    if "_bn" in name:
        assert isinstance(model.bn1_1, vn.BatchNorm)


@pytest.mark.parametrize("fields,error,match", [
    (dict(width=-1.0), ValueError, r"^VGG field width \(channel multiplier\) must be"),
    (dict(taps=("relu9_9",)), ValueError, r"^VGG field taps: unknown tap\(s\) \['relu9_9'\]"),
    (dict(dtype="int8"), ValueError, r"^VGG field dtype"),
    (dict(in_channels=0), ValueError, r"^VGG field in_channels .* positive integer, got 0$"),
    (dict(widht=0.5), TypeError, r"unknown VGG field\(s\) \['widht'\]"),
])
def test_bad_fields_are_one_line_errors(fields, error, match):
    with pytest.raises(error, match=match) as err:
        vn.create("vgg11", **fields)
    assert "\n" not in str(err.value)
    if error is ValueError and "in_channels" not in fields:  # Linen says the same
        with pytest.raises(ValueError) as linen_err:
            vgg_flax.create("vgg11", **fields)
        assert str(linen_err.value) == str(err.value)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown VGG 'vgg12'; choose one of: vgg11, "):
        vn.create("vgg12")


def test_same_function_as_linen_taps_dense_and_channels(tiny):
    model, module, variables, x = tiny
    np.testing.assert_array_equal(model(x), module.apply(variables, x))
    taps = ("relu1_1", "bn3_2", "fc8")
    tapped = vn.to_nnx(module.clone(taps=taps), variables)
    got, want = tapped(x), module.clone(taps=taps).apply(variables, x)
    assert list(got) == list(taps)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    for fields in (dict(dense=True), dict(include_top=False)):
        other = module.clone(**fields)
        np.testing.assert_array_equal(vn.to_nnx(other, variables)(x), other.apply(variables, x))
    # NNX needs input channels up front: conv1_1's kernel follows in_channels
    gray = vn.create("vgg11", in_channels=1, **TINY)
    assert gray.conv1_1.kernel.shape[2] == 1 and gray(x[..., :1]).shape == (4, 10)


def test_train_and_eval_switch_batchnorm_and_dropout(tiny):
    model, module, variables, x = tiny
    model = vn.to_nnx(module, variables)  # a copy of the fixture's state to mutate
    bns = [model.bn1_1, model.bn5_2]
    drops = [model.drop6, model.drop7]
    assert all(b.use_running_average for b in bns) and all(d.deterministic for d in drops)
    before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    np.testing.assert_array_equal(model(x), model(x))  # evaluation: no randomness, no update
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                 before)

    model.train()
    assert not any(b.use_running_average for b in bns) and not any(d.deterministic for d in drops)
    first, second = model(x), model(x)
    assert not np.array_equal(first, second), "dropout draws no new mask per call"
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert not np.array_equal(after["bn1_1"]["mean"], before["bn1_1"]["mean"])
    # two training calls from Linen's state give Linen's running statistics (dropout aside:
    # the statistics are all before fc6)
    stats = variables
    for _ in range(2):
        _, updates = module.apply(stats, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(0)})
        stats = {**stats, **updates}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 after, stats["batch_stats"])

    model.eval()
    assert all(b.use_running_average for b in bns) and all(d.deterministic for d in drops)
    module2, variables2 = vn.to_linen(model)
    np.testing.assert_array_equal(model(x), module2.apply(variables2, x))


def test_state_and_variables_convert_both_ways(tiny):
    model, module, variables, x = tiny
    # to_linen gives the model's own arrays; to_nnx attaches device arrays as they are
    assert variables["params"]["conv1_1"]["kernel"] is model.conv1_1.kernel.get_value()
    back = vn.to_nnx(module, variables)
    assert back.conv1_1.kernel.get_value() is variables["params"]["conv1_1"]["kernel"]
    assert back.bn2_1.var.get_value() is variables["batch_stats"]["bn2_1"]["var"]
    assert set(nnx.to_pure_dict(nnx.state(back, nnx.BatchStat))) == set(variables["batch_stats"])
    # host arrays are copied to the device
    host = jax.tree.map(np.asarray, variables)
    from_host = vn.to_nnx(module, host)
    leaves = jax.tree.leaves(nnx.state(from_host, (nnx.Param, nnx.BatchStat)))
    assert leaves and all(isinstance(a, jax.Array) for a in leaves)
    _, again = vn.to_linen(from_host)
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    # variables that do not fit: one line naming the leaves
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["fc8"]["kernel"] = jnp.zeros((32, 7))
    with pytest.raises(WeightMismatchError,
                       match=r"fc8/kernel is \(32, 7\), expected \(32, 10\)") as err:
        vn.to_nnx(module, bad)
    assert "\n" not in str(err.value)


def test_optimizer_step_under_nnx_jit_matches_linens(tiny):
    """One nnx.Optimizer step (optax SGD with momentum) under nnx.jit: the parameters move, and
    the loss, gradients and new parameters are the Linen step's under jax.jit (training mode,
    BatchNorm on batch statistics; dropout 0 so both compute the same function)."""
    _, module, variables, x = tiny
    module = module.clone(dropout_rate=0.0)
    labels = jnp.arange(x.shape[0]) % 10
    tx = optax.sgd(0.1, momentum=0.9)

    def loss_of(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    model = vn.to_nnx(module, jax.tree.map(jnp.copy, variables))
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: loss_of(m(x)))(model)
        optimizer.update(model, grads)
        return loss, grads

    @jax.jit
    def linen_step(params, stats, opt_state):
        def loss_fn(p):
            logits, updates = module.apply({"params": p, "batch_stats": stats}, x, train=True,
                                           mutable=["batch_stats"])
            return loss_of(logits), updates["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), new_stats, opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    for _ in range(2):  # the second step uses the momentum and statistics of the first
        loss, grads = nnx_step(model, optimizer)
        want = linen_step(params, stats, opt_state)
        want_loss, want_grads, params, stats, opt_state = want
        close(loss, want_loss)
        jax.tree.map(close, nnx.to_pure_dict(grads), want_grads)
    _, now = vn.to_linen(model)
    # every parameter moves (the convolution biases before BatchNorm aside: training-mode BN
    # subtracts them out again, their gradient is 0 up to rounding)
    cancelled = {f"conv{layer[2:]}" for layer in variables["batch_stats"]}
    still = [f"{layer}.{leaf}" for layer, leaves in now["params"].items()
             for leaf, a in leaves.items()
             if np.array_equal(a, variables["params"][layer][leaf])
             and not (layer in cancelled and leaf == "bias")]
    assert not still, f"{still} did not move"
    jax.tree.map(close, now, {"params": params, "batch_stats": stats})


def test_init_follows_linens_laws():
    """Same laws as Linen (model.INITS), NNX's keys: biases 0, BN 1/0 with 0/1 statistics,
    L2Norm 20, kernels with the law's standard deviation (kaiming fan-out for convolutions,
    0.01 for fc layers, Xavier-uniform for SSD's conv6/conv7). Not Linen's draws."""
    model = vn.create("vgg16_ssd", width=0.25, rngs=nnx.Rngs(params=3))
    bn = vn.create("vgg11_bn", **TINY)
    assert float(model.conv4_3_norm.scale.get_value().min()) == 20.0
    for leaf in (bn.bn1_1.scale, bn.bn1_1.var):
        assert np.all(np.asarray(leaf.get_value()) == 1)
    for leaf in (bn.bn1_1.bias, bn.bn1_1.mean, bn.conv1_1.bias, bn.fc6.bias):
        assert np.all(np.asarray(leaf.get_value()) == 0)
    k = np.asarray(model.conv5_3.kernel.get_value())  # 3x3x128x128: 147k draws
    np.testing.assert_allclose(k.std(), np.sqrt(2 / (9 * 128)), rtol=0.02)
    k7 = np.asarray(model.conv7.kernel.get_value())  # 1x1x256x256, U(-a, a)
    a = np.sqrt(6 / (256 + 256))
    assert np.abs(k7).max() <= a and np.abs(k7).max() > 0.99 * a
    np.testing.assert_allclose(k7.std(), a / np.sqrt(3), rtol=0.02)
    fc = np.asarray(vn.create("vgg11", width=0.125, hidden_size=512).fc7.kernel.get_value())
    np.testing.assert_allclose(fc.std(), 0.01, rtol=0.02)


def test_fields_table_is_linens():
    assert set(vn.FIELD_DEFAULTS) == {f.name for f in dataclasses.fields(vgg_flax.VGG)} - {
        "parent", "name"}


_FIRST_USE = """
import sys
import vgg_flax
assert "flax.nnx" not in sys.modules and "vgg_flax.nnx" not in sys.modules, "loaded at import"
assert {"nnx", "to_nnx"} <= set(dir(vgg_flax))
to_nnx = vgg_flax.to_nnx
from vgg_flax import nnx
import vgg_flax.nnx as vn
assert to_nnx is nnx.to_nnx and nnx is vn is vgg_flax.nnx is sys.modules["vgg_flax.nnx"]
try:
    vgg_flax.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("vgg_flax.no_such_name did not raise AttributeError")
print("FIRST USE OK")
"""


def test_nnx_front_end_loads_on_first_use():
    """``import vgg_flax`` does not import flax.nnx (~0.3 s that the CLIs and the trainer never
    need); ``vgg_flax.nnx``, ``vgg_flax.to_nnx`` and both import forms give the one module."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", _FIRST_USE], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0 and "FIRST USE OK" in p.stdout, p.stderr[-2000:]
