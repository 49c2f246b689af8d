"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), the ``lpips`` package's ``LPIPS(net='vgg', version='0.1')``, as a pure JAX function.

>>> from vgg_flax import lpips
>>> params = lpips.params()                  # vgg16's ImageNet trunk (vgg_flax.pretrained) + LPIPS' linear layers
>>> d = lpips.distance(params, x, y)         # x, y: (N, H, W, 3) in [-1, 1] -> (N,)
>>> d = lpips.distance(params, a, b)         # uint8 images: [0, 255], as lpips.im2tensor
>>> jax.grad(lambda x: lpips.distance(params, x, y).sum())(x)

The distance: both images through VGG-16's ``features`` after LPIPS' ScalingLayer; at relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 each position's channel vector is divided by its L2 norm
(+1e-10, as ``lpips.normalize_tensor``), the squared difference is weighted per channel by the
learned 1x1 convolution (no bias) and averaged over space (``spatial=True``: upsampled
bilinearly to the input size, ``align_corners=False`` as lpips, and returned as a map); the five
layers are summed. Images of 16x16 and up, as lpips (the trunk stops at relu5_3, before pool5).
The linear weights ship with vgg_flax (``data/lpips_vgg_v0.1.npz``, converted from the lpips
package's ``weights/v0.1/vgg.pth`` by ``write_linear_weights``; BSD licence in
``data/LPIPS_LICENSE``).
"""
from __future__ import annotations

import io
import os
from importlib import resources
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import arch, registry

LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# lpips.ScalingLayer: inputs in [-1, 1] -> the ImageNet normalisation the trunk was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10                      # lpips.normalize_tensor
# VGG-16's features without pool5: LPIPS stops at relu5_3, so 16x16 images (four 2x2 pools to
# 1x1) are enough, as in lpips; the full cfg would ask for pool5's 32x32.
TRUNK_CFG = arch.CFGS["D"][:-1]
DATA = "data/lpips_vgg_v0.1.npz"


def linear_weights() -> dict[str, np.ndarray]:
    """LPIPS v0.1's per-channel weights for each tapped layer, {layer: (C,) float32}."""
    raw = resources.files("vgg_flax").joinpath(DATA).read_bytes()
    with np.load(io.BytesIO(raw)) as f:
        return {layer: f[layer] for layer in LAYERS}


def write_linear_weights(out: str | os.PathLike | None = None) -> str:
    """Re-create the shipped ``data/lpips_vgg_v0.1.npz`` from the installed lpips package's
    ``weights/v0.1/vgg.pth`` (needs torch and lpips; ``lin{k}.model.1.weight`` (1, C, 1, 1) ->
    (C,)). Returns the path written."""
    import lpips as lp
    import torch
    src = os.path.join(os.path.dirname(lp.__file__), "weights", "v0.1", "vgg.pth")
    sd = torch.load(src, map_location="cpu", weights_only=True)
    arrays = {layer: sd[f"lin{k}.model.1.weight"].numpy().reshape(-1).astype(np.float32)
              for k, layer in enumerate(LAYERS)}
    out = str(out or resources.files("vgg_flax").joinpath(DATA))
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def params(trunk: Mapping[str, Any] | None = None, *, cache_dir: str | os.PathLike | None = None,
           progress: bool = True) -> dict[str, Any]:
    """LPIPS' parameters: ``{"trunk": VGG-16 feature variables, "lin": linear_weights()}``.

    ``trunk``: variables of a ``vgg16`` (with or without its classifier, which is dropped);
    default ``vgg_flax.pretrained("vgg16")``'s (see there for where they come from, offline)."""
    if trunk is None:
        from vgg_flax.published import pretrained
        _, trunk = pretrained("vgg16", include_top=False, cache_dir=cache_dir, progress=progress)
    convs = {layer.name for layer in registry.create("vgg16", include_top=False).layers()
             if layer.kind == "conv"}
    p = trunk["params"]
    missing = sorted(convs - set(p))
    if missing:
        raise ValueError(f"trunk variables lack {', '.join(missing)}: pass vgg16's variables "
                         "(vgg_flax.pretrained('vgg16') or vgg_flax.load of a vgg16 checkpoint)")
    return {"trunk": {"params": {k: p[k] for k in sorted(convs)}},
            "lin": {k: jnp.asarray(v) for k, v in linear_weights().items()}}


def _unit(f: jax.Array) -> jax.Array:
    """f / (||f||_channels + eps), with a zero (not NaN) gradient where a position is all zero."""
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    norm = jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)
    return f / (norm + EPS)


def _signed_unit(a: jax.Array, normalize: bool) -> jax.Array:
    """Images in [-1, 1], as LPIPS compares them: floats as given (from [0, 1] with
    ``normalize``); unsigned integers from [0, their dtype's maximum] (uint8: [0, 255]), as
    lpips.im2tensor converts uint8 images (x / 127.5 - 1), whatever ``normalize`` says."""
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.unsignedinteger):
        return a.astype(jnp.float32) / (jnp.iinfo(a.dtype).max / 2) - 1
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"lpips.distance takes float images (in [-1, 1], or [0, 1] with "
                         f"normalize=True) or unsigned-integer ones (uint8: [0, 255]), got "
                         f"{a.dtype}; cast to float and scale first")
    return 2 * a - 1 if normalize else a


def distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *, spatial: bool = False,
             normalize: bool = False, conv: str = "auto", precision: Any = None) -> jax.Array:
    """LPIPS distance between image batches ``x`` and ``y`` (N, H, W, 3), H and W at least 16:
    floats in [-1, 1] (or [0, 1] with ``normalize=True``, as lpips' flag), or unsigned integers
    (uint8 in [0, 255], whatever ``normalize`` says). Returns (N,), or with ``spatial=True`` the
    (N, H, W) map whose spatial mean is the distance. ``conv``/``precision``: as
    ``vgg_flax.VGG``."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"lpips.distance wants two (N, H, W, 3) batches of one shape, got "
                         f"{x.shape} and {y.shape}")
    trunk = registry.create("vgg16", include_top=False, taps=LAYERS, conv=conv,
                            precision=precision, cfg=TRUNK_CFG)
    m = trunk.min_input_size()
    if min(x.shape[1:3]) < m:
        raise ValueError(f"lpips.distance needs images of at least {m}x{m} (four 2x2 pools "
                         f"before relu5_3, as lpips), got {x.shape[1]}x{x.shape[2]}; resize "
                         "them up")
    x, y = _signed_unit(x, normalize), _signed_unit(y, normalize)
    shift, scale = jnp.asarray(SHIFT, x.dtype), jnp.asarray(SCALE, x.dtype)
    n = x.shape[0]
    taps = trunk.apply(params["trunk"], (jnp.concatenate([x, y]) - shift) / scale)
    total = 0.0
    for layer in LAYERS:
        f = _unit(taps[layer])
        d = jnp.square(f[:n] - f[n:])
        w = jnp.asarray(params["lin"][layer], d.dtype)
        per = jnp.einsum("nhwc,c->nhw", d, w, precision=precision)
        if spatial:
            total = total + jax.image.resize(per, (n,) + x.shape[1:3], "linear")
        else:
            total = total + per.mean(axis=(1, 2))
    return total
