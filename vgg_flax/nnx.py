"""The same VGG as an ``nnx.Module`` (Flax NNX), holding the same weights."""
from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx.bridge import variables as bridge_vars

from vgg_flax.model import VGG
from vgg_flax.weights import on_device


def to_nnx(module: VGG, variables: dict[str, Any], seed: int = 0) -> nnx.Module:
    """Wrap a Linen VGG and its variables as an NNX module: ``model(x, train=False)``.

    No forward pass runs; ``jax.Array`` variables are attached as they are, host arrays are
    copied to the default device. ``nnx.state(model)`` gives them back, ``seed`` feeds dropout.
    """
    model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(params=seed, dropout=seed))
    for attr, value in bridge_vars.linen_vars_to_nnx_attrs(on_device(variables)).items():
        setattr(model, attr, nnx.data(value))
    return model
