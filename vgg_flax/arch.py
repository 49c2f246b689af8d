"""Every VGG as a row of data, and the one walk over it that names the layers.

A cfg is a tuple of tokens, read left to right as in torchvision's ``make_layers``:

- ``64``        a 3x3 convolution (padding 1) with 64 output channels, then ReLU;
- ``(256, 1)``  a 1x1 convolution (padding 0), as in the paper's configuration C;
- ``"M"``       a 2x2 max pool, stride 2 (floor mode);
- ``"C"``       the same pool in ceil mode (SSD300's pool3, so 75x75 -> 38x38);
- ``"LRN"``     local response normalisation (the paper's A-LRN, after relu1_1).

A variant adds a head: ``"fc"`` (torchvision's classifier: adaptive average pool to 7x7, fc6,
fc7, fc8) or ``"ssd"`` (SSD300's atrous tail: pool5 3x3/1/1, conv6 3x3 dilation 6, conv7 1x1).
The layer walk below is shared by the Flax module and by the torch <-> Flax weight mapping, so
the two can never disagree about which layer is which.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Table 1 of Simonyan & Zisserman (arXiv 1409.1556), letters as in the paper.
CFGS: dict[str, tuple[Any, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "A-LRN": (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "C": (64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    # SSD300's base (Liu et al. 2016; ssd.pytorch's base['300']): D with a ceil-mode pool3 and
    # no pool5 (the "ssd" head brings its own 3x3 stride-1 pool5).
    "D-SSD": (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One named VGG: the architecture fields it gives to ``VGG``."""
    cfg: str                     # key of CFGS
    batch_norm: bool = False
    head: str = "fc"             # "fc" (classifier) or "ssd" (atrous conv6/conv7)
    hidden_size: int = 4096      # fc6/fc7 width; conv6/conv7 width for the SSD head
    l2norm: bool = False         # SSD's learnable L2Norm branch on relu4_3
    torchvision: str | None = None  # torchvision builder this variant is identical to

    def module_fields(self) -> dict[str, Any]:
        return dict(cfg=CFGS[self.cfg], batch_norm=self.batch_norm, head=self.head,
                    hidden_size=self.hidden_size, l2norm=self.l2norm)


VARIANTS: dict[str, Variant] = {
    "vgg11": Variant("A", torchvision="vgg11"),
    "vgg11_bn": Variant("A", batch_norm=True, torchvision="vgg11_bn"),
    "vgg13": Variant("B", torchvision="vgg13"),
    "vgg13_bn": Variant("B", batch_norm=True, torchvision="vgg13_bn"),
    "vgg16": Variant("D", torchvision="vgg16"),
    "vgg16_bn": Variant("D", batch_norm=True, torchvision="vgg16_bn"),
    "vgg19": Variant("E", torchvision="vgg19"),
    "vgg19_bn": Variant("E", batch_norm=True, torchvision="vgg19_bn"),
    "vgg11_lrn": Variant("A-LRN"),
    "vgg16_c": Variant("C"),
    "vgg16_ssd": Variant("D-SSD", head="ssd", hidden_size=1024, l2norm=True),
}


# SSD's L2Norm is a branch, not a step of the chain: it reads relu4_3 and feeds the detector,
# under this name (ssd.pytorch's and torchvision's ``scale_weight``).
L2NORM_AFTER, L2NORM_NAME = "relu4_3", "conv4_3_norm"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One step of the forward pass, named as in the paper and Caffe (conv3_2, relu4_3, pool5)."""
    name: str
    kind: str                    # conv | bn | relu | lrn | pool | l2norm | fc | dropout
    features: int = 0            # output channels (conv, fc)
    kernel: int = 3
    padding: int = 1
    dilation: int = 1
    pool: str = ""               # "floor", "ceil" or "3x3s1"
    torch_index: int | None = None  # position in torchvision's nn.Sequential
    # The initialisation law of a conv/fc layer (model.INITS): torchvision's "kaiming" (normal,
    # fan-out, ReLU gain) for convolutions, "fc" (N(0, 0.01)) for linear layers, SSD's "xavier".
    init: str = ""
    # fc6 reads the whole feature map: adaptive-average-pooled and flattened, or, in dense
    # evaluation, as a convolution whose window is that pooled size.
    reads_map: bool = False


def scale(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def features_layers(cfg: Sequence[Any], batch_norm: bool, width: float = 1.0) -> list[Layer]:
    """The convolutional part, in order, with torchvision's ``make_layers`` indices."""
    layers: list[Layer] = []
    block, conv, index = 1, 0, 0
    for token in cfg:
        if token in ("M", "C"):
            layers.append(Layer(f"pool{block}", "pool", pool="floor" if token == "M" else "ceil",
                                torch_index=index))
            block, conv, index = block + 1, 0, index + 1
        elif token == "LRN":
            layers.append(Layer(f"norm{block}", "lrn", torch_index=index))
            index += 1
        else:
            channels, kernel = token if isinstance(token, (tuple, list)) else (token, 3)
            conv += 1
            tag = f"{block}_{conv}"
            layers.append(Layer(f"conv{tag}", "conv", features=scale(channels, width),
                                kernel=kernel, padding=kernel // 2, torch_index=index,
                                init="kaiming"))
            index += 1
            if batch_norm:
                layers.append(Layer(f"bn{tag}", "bn", torch_index=index))
                index += 1
            layers.append(Layer(f"relu{tag}", "relu", torch_index=index))
            index += 1
    return layers


def ssd_head_layers(hidden_size: int, width: float = 1.0) -> list[Layer]:
    """SSD300's atrous replacement for pool5/fc6/fc7 (torchvision ``SSDFeatureExtractorVGG.fc``)."""
    hidden = scale(hidden_size, width)
    return [
        Layer("pool5", "pool", pool="3x3s1", torch_index=0),
        Layer("conv6", "conv", features=hidden, kernel=3, padding=6, dilation=6, torch_index=1,
              init="xavier"),
        Layer("relu6", "relu", torch_index=2),
        Layer("conv7", "conv", features=hidden, kernel=1, padding=0, torch_index=3,
              init="xavier"),
        Layer("relu7", "relu", torch_index=4),
    ]


def fc_head_layers(hidden_size: int, num_classes: int) -> list[Layer]:
    """torchvision's ``classifier``: fc6-ReLU-Dropout-fc7-ReLU-Dropout-fc8."""
    return [
        Layer("fc6", "fc", features=hidden_size, torch_index=0, init="fc", reads_map=True),
        Layer("relu6", "relu", torch_index=1),
        Layer("drop6", "dropout", torch_index=2),
        Layer("fc7", "fc", features=hidden_size, torch_index=3, init="fc"),
        Layer("relu7", "relu", torch_index=4),
        Layer("drop7", "dropout", torch_index=5),
        Layer("fc8", "fc", features=num_classes, torch_index=6, init="fc"),
    ]
