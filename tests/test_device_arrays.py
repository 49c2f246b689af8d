"""Variables vgg_flax hands a user are jax.Arrays on the default device, not numpy: a jitted
``apply`` then transfers nothing per call (numpy leaves would copy every parameter to the device
again on each call). ``pretrained`` is covered in tests/test_pretrained.py on its fixtures.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import vgg_flax
from vgg_flax import checkpoint
from vgg_flax.convert import formats, mapping, verify

SMALL = dict(num_classes=10, width=0.25, hidden_size=64, pool_size=(1, 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1/4-width vgg11_bn (BatchNorm: both collections), seeded torch weights, and a .pth."""
    module = vgg_flax.create("vgg11_bn", **SMALL)
    torch.manual_seed(0)
    model = verify.torch_reference("vgg11_bn", module).to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("device") / "small.pth"
    torch.save(sd, path)
    return module, sd, path


def assert_on_device(variables, dtype):
    """Every leaf a jax.Array on the default device, of ``dtype`` (BatchNorm statistics too)."""
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, jax.Array), (jax.tree_util.keystr(path), type(leaf))
        assert leaf.devices() == {jax.devices()[0]}, jax.tree_util.keystr(path)
        assert leaf.dtype == dtype, (jax.tree_util.keystr(path), leaf.dtype)


def test_from_torch_gives_device_arrays_that_apply_without_transfers(small):
    module, sd, _ = small
    variables = vgg_flax.from_torch(sd, module)
    assert_on_device(variables, np.float32)
    x = jnp.ones((1, 32, 32, 3))
    apply = jax.jit(module.apply)
    with jax.transfer_guard_host_to_device("disallow"):  # numpy leaves would be copied here
        jax.block_until_ready(apply(variables, x))
    assert_on_device(vgg_flax.from_torch({k: v.to(torch.bfloat16) for k, v in sd.items()},
                                         module), ml_dtypes.bfloat16)
    assert_on_device(vgg_flax.from_torch(sd, module, dtype=jnp.float16), np.float16)
    # never a view of the caller's tensors: changing them later changes nothing here
    before = {k: np.array(v) for k, v in formats.flatten(variables)}
    with torch.no_grad():
        for t in sd.values():
            t.add_(1)
    try:
        assert all(np.array_equal(before[k], v) for k, v in formats.flatten(variables))
    finally:
        with torch.no_grad():
            for t in sd.values():
                t.sub_(1)


def test_load_converter_and_nnx_give_device_arrays(small, tmp_path):
    module, sd, path = small
    _, variables = mapping.load_torch_weights("vgg11_bn", path, progress=False,
                                              num_classes=10, overrides=SMALL)
    assert_on_device(variables, np.float32)
    vgg_flax.save(tmp_path / "ckpt", variables, "vgg11_bn", module=module)
    _, loaded = vgg_flax.load(tmp_path / "ckpt")
    assert_on_device(loaded, np.float32)
    # writers of files read numpy, with no trip through the device
    assert all(isinstance(a, np.ndarray) for _, a in formats.flatten(
        checkpoint.read(tmp_path / "ckpt")[1]))
    assert all(isinstance(a, np.ndarray) for _, a in formats.flatten(
        formats.read_flax(tmp_path / "ckpt")[2]))
    # to_nnx: host arrays go to the device; device arrays are used as they are (no copy)
    host = jax.tree.map(np.asarray, loaded)
    assert_on_device(nnx.state(vgg_flax.to_nnx(module, host), (nnx.Param, nnx.BatchStat)),
                     np.float32)
    kept = vgg_flax.to_nnx(module, loaded)
    assert kept.conv1_1.kernel.get_value() is loaded["params"]["conv1_1"]["kernel"]
