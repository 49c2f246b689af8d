"""Style and content losses on VGG taps (Gatys, Ecker & Bethge, CVPR 2016, eqs. 1-7).

>>> module, variables = vgg_flax.pretrained("vgg19", include_top=False, taps=losses.TAPS)
>>> pre = vgg_flax.metadata("vgg19")["preprocessing"]      # images in [0, 1], NHWC
>>> feats = lambda im: module.apply(variables, (im - jnp.array(pre["mean"])) / jnp.array(pre["std"]))
>>> target = losses.targets(feats(content_image), feats(style_image))
>>> loss = lambda x: losses.gatys(feats(x), target).sum()      # jax.grad(loss)(x)

Taps are the ReLU outputs (Caffe's in-place ReLU makes the paper's "conv4_2" the rectified map).
Per image, with F_l the (M_l = H*W, N_l = C) feature matrix of layer l:

- content (eq. 1): 1/2 sum (F_l - P_l)^2 on ``CONTENT_LAYERS`` (relu4_2);
- Gram matrix G_l = F_l^T F_l / M_l (``gram``: normalised by the number of positions, so
  images of any size compare);
- style (eqs. 4-5): sum_l w_l E_l, E_l = 1/(4 N_l^2) sum (G_l - A_l)^2, which is the paper's
  1/(4 N_l^2 M_l^2) sum of unnormalised Gram differences; w_l = 1/5 on ``STYLE_LAYERS``;
- total (eq. 7): alpha * content + beta * style (alpha/beta = 1e-3 in the paper's Fig. 2).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYERS = ("relu4_2",)
TAPS = STYLE_LAYERS + CONTENT_LAYERS
Array = jax.Array


def gram(f: Array, precision: Any = jax.lax.Precision.HIGHEST) -> Array:
    """(N, H, W, C) -> (N, C, C): F^T F / (H * W), per image."""
    n, h, w, c = f.shape
    m = f.reshape(n, h * w, c)
    return jnp.einsum("npc,npd->ncd", m, m, precision=precision) / (h * w)


def content_loss(feats: Mapping[str, Array], content: Mapping[str, Array],
                 layers: Sequence[str] = CONTENT_LAYERS) -> Array:
    """Eq. 1, summed over ``layers``: (N,)."""
    return sum(0.5 * jnp.sum(jnp.square(feats[l] - content[l]), axis=(1, 2, 3)) for l in layers)


def style_loss(feats: Mapping[str, Array], style_grams: Mapping[str, Array],
               weights: Mapping[str, float] | None = None) -> Array:
    """Eqs. 4-5: sum_l w_l / (4 N_l^2) * sum (G_l - A_l)^2, (N,). ``style_grams`` are ``gram`` of
    the style image's taps, (N, C, C) or (1, C, C) (broadcast); ``weights`` default 1/len."""
    weights = weights or {l: 1.0 / len(style_grams) for l in style_grams}
    total = 0.0
    for l, w in weights.items():
        c = feats[l].shape[-1]
        total = total + w * jnp.sum(jnp.square(gram(feats[l]) - style_grams[l]),
                                    axis=(1, 2)) / (4.0 * c * c)
    return total


def targets(content_feats: Mapping[str, Array], style_feats: Mapping[str, Array],
            content_layers: Sequence[str] = CONTENT_LAYERS,
            style_layers: Sequence[str] = STYLE_LAYERS) -> dict[str, dict[str, Array]]:
    """What ``gatys`` compares against: the content image's maps and the style image's Grams."""
    return {"content": {l: content_feats[l] for l in content_layers},
            "style": {l: gram(style_feats[l]) for l in style_layers}}


def gatys(feats: Mapping[str, Array], target: Mapping[str, Mapping[str, Array]], *,
          alpha: float = 1.0, beta: float = 1e3,
          style_weights: Mapping[str, float] | None = None) -> Array:
    """Eq. 7: alpha * content + beta * style, per image (N,). ``target`` from ``targets``."""
    return (alpha * content_loss(feats, target["content"], tuple(target["content"]))
            + beta * style_loss(feats, target["style"], style_weights))
