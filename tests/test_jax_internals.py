"""vgg_flax.jax_internals: every private JAX API behind a probe, and life without each of them.

Each probe is made to fail in turn (its accessor raises, as a JAX that moved the name would
make it): the oneDNN-backed default then runs XLA's convolutions, forward and gradient, with one
warning that names the probe, and conv="onednn" refuses in one line. A subprocess removes the
internals before ``import vgg_flax``, as a future JAX would, and still imports and trains.
"""
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_flax
from vgg_flax import jax_internals, onednn

BREAKS = {  # probe -> the accessor whose failure it stands for
    "primitives": "primitive_api",
    "devices_during_lowering": "devices_during_lowering",
    "lowering_context": "for_export",
}


@pytest.fixture(scope="module")
def tiny():
    model = vgg_flax.create("vgg11", num_classes=10, width=0.125, hidden_size=16,
                            pool_size=(1, 1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.2, a.dtype),
        jax.eval_shape(model.init, jax.random.key(0), x))
    return model, variables, x


def forward_and_grad(model, variables, x):
    def loss(v):
        return jnp.sum(model.apply(v, x) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables)


@pytest.fixture
def fresh():
    jax_internals.reset()
    onednn._warn_blocked.cache_clear()
    yield
    jax_internals.reset()
    onednn._warn_blocked.cache_clear()


def test_every_probe_passes_on_this_jax():
    """CI runs this on the oldest and newest JAX that pyproject admits."""
    assert jax_internals.report() == {name: "ok" for name in jax_internals.PROBES}
    assert onednn._blocker() == ""


@pytest.mark.parametrize("probe", sorted(BREAKS))
def test_a_failed_probe_falls_back_to_xla(tiny, fresh, monkeypatch, probe):
    model, variables, x = tiny

    def moved(*args, **kwargs):
        raise AttributeError(f"module 'jax' has no attribute {BREAKS[probe]!r}")
    monkeypatch.setattr(jax_internals, BREAKS[probe], moved)
    assert "ok" not in jax_internals.report()[probe]

    with jax.default_matmul_precision("highest"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads = forward_and_grad(model, variables, x)
            forward_and_grad(model.clone(), variables, x)  # a second program: no second warning
        ref_loss, ref_grads = forward_and_grad(model.clone(conv="xla"), variables, x)
    ours = [str(w.message) for w in caught if "oneDNN" in str(w.message)]
    assert len(ours) == 1 and repr(probe) in ours[0], ours
    # The fallback is XLA's convolution itself: the same program as conv="xla".
    np.testing.assert_array_equal(loss, ref_loss)
    jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)
    assert float(loss) > 0 and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

    with pytest.raises(ValueError) as refused:
        model.clone(conv="onednn").apply(variables, x)
    message = str(refused.value)
    assert "\n" not in message and repr(probe) in message and "conv='auto'" in message


def test_the_default_runs_onednn_when_the_probes_pass(tiny, fresh):
    """The control for the test above: with every probe passing, conv="auto" is oneDNN's
    custom call, not XLA's convolution."""
    model, variables, x = tiny
    text = jax.jit(model.apply).lower(variables, x).as_text()
    assert "vgg_flax_conv" in text and "convolution" not in text


BROKEN_JAX = r"""
import warnings
import jax, jax.interpreters.ad, jax._src.dispatch, jax._src.xla_bridge
# What a future JAX could look like: the private names vgg_flax reaches are gone or changed
# (JAX's own code still reads the registry, so it becomes immutable rather than disappearing).
del jax.interpreters.ad.primitive_jvps
jax._src.dispatch.prim_requires_devices_during_lowering = frozenset()
del jax._src.xla_bridge.backends_are_initialized
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vgg_flax
    import jax.numpy as jnp
    from vgg_flax import jax_internals, onednn
    model = vgg_flax.create("vgg11", num_classes=3, width=0.125, hidden_size=8, pool_size=(1, 1))
    x = jnp.ones((1, 32, 32, 3))
    v = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype),
                     jax.eval_shape(model.init, jax.random.key(0), x))
    g = jax.jit(jax.grad(lambda v: model.apply(v, x).sum()))(v)
assert onednn.conv_p is None, "primitives defined without their machinery"
report = jax_internals.report()
assert all(r != "ok" for r in report.values()), report  # lowering_context needs primitives
blocked = [str(w.message) for w in caught if "oneDNN" in str(w.message)]
assert len(blocked) == 1, blocked
try:
    model.clone(conv="onednn").apply(v, x)
except ValueError as e:
    assert "\n" not in str(e), str(e)
else:
    raise AssertionError("conv='onednn' ran without its primitives")
print("ok", vgg_flax.HOST_MALLOC)
"""


def test_import_and_train_on_a_jax_without_the_internals():
    run = subprocess.run([sys.executable, "-c", BROKEN_JAX], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ,
                                           "VGG_FLAX_MALLOC": "tuned"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok"), run.stdout
