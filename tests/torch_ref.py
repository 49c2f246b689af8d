"""Reference torch models for the parity tests: torchvision's own modules, seeded."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import VGG as TorchVGG

TORCHVISION_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
                     "vgg19_bn")


def _nonzero(n: int, g: torch.Generator, low: float, high: float) -> torch.Tensor:
    """Uniform in [low, high) with a random sign: never 0, so a dropped term always shows."""
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return sign * (low + (high - low) * torch.rand(n, generator=g))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every bias, BatchNorm statistic and scale non-trivial (torchvision initialises biases and
    BN shifts to 0, running stats to 0/1 and SSD's L2Norm scale to 20, so a dropped or swapped
    bias would pass a parity test). Conv/Linear biases are +-[0.02, 0.1]: the same order as a
    3x3 conv's output on unit inputs, so leaving one out moves the logits far beyond 1e-4."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(_nonzero(m.bias.numel(), g, 0.02, 0.1))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(_nonzero(n, g, 0.01, 0.1))
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(_nonzero(n, g, 0.01, 0.1))
        for name, p in model.named_parameters():
            if name.endswith("scale_weight"):  # SSD's L2Norm (torchvision: a constant 20)
                p.copy_(20 * (0.5 + torch.rand(p.shape, generator=g)))
    return model


@functools.cache
def torchvision_vgg(name: str, seed: int = 0) -> nn.Module:
    """torchvision.models.<name>() with seeded random weights, in eval mode (cached)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return randomize(model, seed)


def paper_features(cfg) -> nn.Sequential:
    """torch layers for a row of the paper's Table 1, built from torch modules only.

    LRN as Krizhevsky et al. (k=2, n=5, alpha=1e-4, beta=0.75); torch divides alpha by size.
    """
    layers, cin = [], 3
    for t in cfg:
        if t == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif t == "LRN":
            layers.append(nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0))
        else:
            cout, k = t if isinstance(t, tuple) else (t, 3)
            layers += [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers)


@functools.cache
def paper_vgg(cfg_key: str, seed: int = 0) -> nn.Module:
    from vgg_flax.arch import CFGS  # only the table of channel counts, not our layer code
    torch.manual_seed(seed)
    return randomize(TorchVGG(paper_features(CFGS[cfg_key])).eval(), seed)


@functools.cache
def ssd_backbone(seed: int = 0) -> nn.Module:
    """torchvision's SSDFeatureExtractorVGG around a seeded torchvision vgg16."""
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
    torch.manual_seed(seed)
    return randomize(SSDFeatureExtractorVGG(torchvision.models.vgg16(weights=None).features,
                                            highres=False).eval(), seed)


def ssd_backbone_state_dict(model: nn.Module) -> dict:
    """The backbone part of SSDFeatureExtractorVGG: drops SSD's extra blocks extra.1 ... extra.4."""
    return {k: v for k, v in model.state_dict().items()
            if not (k.startswith("extra.") and not k.startswith("extra.0."))}


def nhwc(x: torch.Tensor) -> np.ndarray:
    # a copy: torchvision's in-place ReLUs would overwrite a view
    return np.ascontiguousarray(x.detach().permute(0, 2, 3, 1).numpy())
