"""timm's VGG state_dict layout -> torchvision's, as a pure mapping of names and shapes.

timm (``timm/<name>.tv_in1k`` on the Hugging Face hub) keeps torchvision's ``features.N`` keys
but runs the classifier as convolutions (its ``ConvMlp``, so any input size works):

- ``pre_logits.fc1``: a 7x7 convolution (4096, 512, 7, 7) = torchvision's ``classifier.0``
  Linear (4096, 25088), whose input is the (C, H, W)-flattened 7x7 pool5 map: a reshape;
- ``pre_logits.fc2``: a 1x1 convolution (4096, 4096, 1, 1) = ``classifier.3``: a reshape;
- ``head.fc``: a Linear = ``classifier.6``.

This is the inverse of timm's own ``_filter_fn`` in ``timm/models/vgg.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

# timm module -> torchvision module (both followed by ".weight"/".bias").
TIMM_TO_TORCHVISION = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3",
                       "head.fc": "classifier.6"}


def is_timm_layout(keys: Iterable[str]) -> bool:
    """True when ``keys`` are a timm VGG state_dict (its ``pre_logits``/``head.fc`` classifier)."""
    return any(k.rsplit(".", 1)[0] in TIMM_TO_TORCHVISION for k in keys)


def torchvision_key(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """(torchvision key, torchvision shape) of timm's ``key`` of ``shape``; other keys unchanged.

    A convolution weight (out, in, kh, kw) of the classifier becomes the Linear weight
    (out, in * kh * kw): torch flattens pool5 as (C, H, W), the order of the kernel's axes.
    """
    module, _, leaf = key.rpartition(".")
    if module not in TIMM_TO_TORCHVISION:
        return key, tuple(shape)
    shape = tuple(shape)
    if leaf == "weight" and len(shape) == 4:
        shape = (shape[0], shape[1] * shape[2] * shape[3])
    return f"{TIMM_TO_TORCHVISION[module]}.{leaf}", shape


def to_torchvision(state_dict: Mapping[str, Any],
                   reshape: Callable[[Any, tuple[int, ...]], Any] = lambda a, s: a.reshape(s)
                   ) -> dict[str, Any]:
    """timm's VGG state_dict -> torchvision's keys and shapes (numpy arrays or torch tensors;
    ``reshape(value, shape)`` for any other array type). Values are reshaped, never copied."""
    out = {}
    for key, value in state_dict.items():
        new, shape = torchvision_key(key, tuple(value.shape))
        out[new] = value if shape == tuple(value.shape) else reshape(value, shape)
    return out
