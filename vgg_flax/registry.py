"""Names -> modules and metadata. Variants themselves are data in ``arch.VARIANTS``."""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Sequence

from vgg_flax import arch
from vgg_flax.model import VGG

# ImageNet's per-channel mean and std in 0..1 units, as torchvision's weights were trained.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET = dict(resize_size=256, crop_size=224, interpolation="bilinear", antialias=True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
# ssd.pytorch's VGG was trained on 0..255 pixels minus the Caffe mean (torchvision's
# VGG16_Weights.IMAGENET1K_FEATURES transforms).
_SSD = dict(_IMAGENET, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255))

# torchvision 0.29's Weights.meta for IMAGENET1K_V1 (acc on ImageNet-1K val at 224, "_ops" is
# torchvision's GFLOPS figure, which counts one multiply-add as one op). A test checks these
# against torchvision itself; the other rows are computed from our own modules.
_TORCHVISION = {
    "vgg11": (132863336, 7.609, 69.020, 88.628, 506.84, "vgg11-8a719046.pth"),
    "vgg11_bn": (132868840, 7.609, 70.370, 89.810, 506.881, "vgg11_bn-6002323d.pth"),
    "vgg13": (133047848, 11.308, 69.928, 89.246, 507.545, "vgg13-19584684.pth"),
    "vgg13_bn": (133053736, 11.308, 71.586, 90.374, 507.59, "vgg13_bn-abd245e5.pth"),
    "vgg16": (138357544, 15.470, 71.592, 90.382, 527.796, "vgg16-397923af.pth"),
    "vgg16_bn": (138365992, 15.470, 73.360, 91.516, 527.866, "vgg16_bn-6c64b313.pth"),
    "vgg19": (143667240, 19.632, 72.376, 90.876, 548.051, "vgg19-dcbb9e9d.pth"),
    "vgg19_bn": (143678248, 19.632, 74.218, 91.842, 548.143, "vgg19_bn-c79401a0.pth"),
}
# Computed from our modules with count_macs at the input size (224, SSD 300), counted as
# torchvision counts; tests/test_model.py keeps them honest.
_OURS = {
    "vgg11_lrn": (132863336, 7.609),
    "vgg16_c": (133638952, 11.771),
    "vgg16_ssd": (20484416, 29.898),
}

# SSD300's backbone: the one variant whose published weights are not IMAGENET1K_V1.
SSD_NAME = "vgg16_ssd"


def default_weights(name: str) -> str:
    """The member of torchvision's Weights enum published for ``name``: ``IMAGENET1K_V1``; for
    the SSD backbone, ``IMAGENET1K_FEATURES``."""
    return "IMAGENET1K_FEATURES" if name == SSD_NAME else "IMAGENET1K_V1"


def list_models() -> list[str]:
    """Every name ``create`` accepts."""
    return list(arch.VARIANTS)


def _variant(name: str) -> arch.Variant:
    if name not in arch.VARIANTS:
        raise ValueError(f"unknown VGG {name!r}; choose one of: {', '.join(arch.VARIANTS)}")
    return arch.VARIANTS[name]


def create(name: str, **overrides: Any) -> VGG:
    """The Linen module for ``name`` (see ``list_models``), with any ``VGG`` field overridden.

    >>> create("vgg16", taps=("relu1_2", "relu4_3"))
    >>> create("vgg11", num_classes=10, width=0.25, hidden_size=256, pool_size=(1, 1))
    """
    fields = _variant(name).module_fields()
    unknown = set(overrides) - set(VGG.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise TypeError(f"unknown VGG field(s) {sorted(unknown)}; fields are "
                        f"{', '.join(f for f in VGG.__dataclass_fields__ if f not in ('parent', 'name'))}")
    fields.update(overrides)
    return VGG(**fields)


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in torchvision's order (shipped with the package)."""
    text = resources.files("vgg_flax").joinpath("data/imagenet_categories.json").read_text()
    return tuple(json.loads(text))


def metadata(name: str) -> dict[str, Any]:
    """What a name is: its paper config, size, cost, reference accuracy and preprocessing.

    ``gflops`` counts a multiply-add as one, as torchvision's meta does, at ``input_size``.
    """
    v = _variant(name)
    meta: dict[str, Any] = {
        "name": name, "paper_config": v.cfg, "batch_norm": v.batch_norm, "head": v.head,
        "torchvision_builder": v.torchvision, "input_size": (224, 224, 3),
    }
    if name in _TORCHVISION:
        n, gflops, top1, top5, mb, file = _TORCHVISION[name]
        meta.update(num_params=n, gflops=gflops, acc1=top1, acc5=top5, file_size_mb=mb,
                    weights="IMAGENET1K_V1", weights_url=f"https://download.pytorch.org/models/{file}",
                    categories=imagenet_categories(), num_classes=1000, preprocessing=dict(_IMAGENET))
    else:
        n, gflops = _OURS[name]
        meta.update(num_params=n, gflops=gflops, acc1=None, acc5=None, categories=None,
                    num_classes=1000 if v.head == "fc" else None,
                    weights=None, preprocessing=dict(_IMAGENET))
    if name == "vgg16_ssd":
        meta.update(weights="VGG16_Weights.IMAGENET1K_FEATURES", preprocessing=dict(_SSD),
                    input_size=(300, 300, 3),
                    weights_url="https://download.pytorch.org/models/vgg16_features-amdegroot-88682ab5.pth")
    return meta


# The named classes: ``VGG`` with a variant's fields as defaults, so ``VGG16(num_classes=10)``
# works like ``create("vgg16", num_classes=10)``. tests/test_model.py checks that each class's
# defaults equal ``arch.VARIANTS[name].module_fields()``.
class VGG11(VGG):
    """VGG-11, the paper's configuration A (torchvision ``vgg11``)."""
    cfg: Sequence[Any] = arch.CFGS["A"]


class VGG11_BN(VGG):
    """VGG-11 with BatchNorm (torchvision ``vgg11_bn``)."""
    cfg: Sequence[Any] = arch.CFGS["A"]
    batch_norm: bool = True


class VGG13(VGG):
    """VGG-13, configuration B (torchvision ``vgg13``)."""
    cfg: Sequence[Any] = arch.CFGS["B"]


class VGG13_BN(VGG):
    """VGG-13 with BatchNorm (torchvision ``vgg13_bn``)."""
    cfg: Sequence[Any] = arch.CFGS["B"]
    batch_norm: bool = True


class VGG16(VGG):
    """VGG-16, configuration D (torchvision ``vgg16``)."""
    cfg: Sequence[Any] = arch.CFGS["D"]


class VGG16_BN(VGG):
    """VGG-16 with BatchNorm (torchvision ``vgg16_bn``)."""
    cfg: Sequence[Any] = arch.CFGS["D"]
    batch_norm: bool = True


class VGG19(VGG):
    """VGG-19, configuration E (torchvision ``vgg19``)."""
    cfg: Sequence[Any] = arch.CFGS["E"]


class VGG19_BN(VGG):
    """VGG-19 with BatchNorm (torchvision ``vgg19_bn``)."""
    cfg: Sequence[Any] = arch.CFGS["E"]
    batch_norm: bool = True


class VGG11_LRN(VGG):
    """VGG-11 with LRN after relu1_1, the paper's A-LRN."""
    cfg: Sequence[Any] = arch.CFGS["A-LRN"]


class VGG16_C(VGG):
    """VGG-16 with 1x1 convolutions, the paper's configuration C."""
    cfg: Sequence[Any] = arch.CFGS["C"]


class VGG16_SSD(VGG):
    """SSD300's atrous VGG-16 backbone (conv4_3 L2Norm, conv6, conv7)."""
    cfg: Sequence[Any] = arch.CFGS["D-SSD"]
    head: str = "ssd"
    hidden_size: int = 1024
    l2norm: bool = True


NAMED_CLASSES: dict[str, type[VGG]] = {
    "vgg11": VGG11, "vgg11_bn": VGG11_BN, "vgg13": VGG13, "vgg13_bn": VGG13_BN,
    "vgg16": VGG16, "vgg16_bn": VGG16_BN, "vgg19": VGG19, "vgg19_bn": VGG19_BN,
    "vgg11_lrn": VGG11_LRN, "vgg16_c": VGG16_C, "vgg16_ssd": VGG16_SSD,
}
