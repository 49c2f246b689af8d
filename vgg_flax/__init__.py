"""VGG (Simonyan & Zisserman, arXiv 1409.1556) in JAX/Flax, numerically identical to torchvision.

>>> import vgg_flax
>>> model = vgg_flax.VGG16(num_classes=10)              # a Flax Linen module, NHWC
>>> model = vgg_flax.create("vgg16", taps=("relu1_2", "relu4_3"))
>>> variables = vgg_flax.from_torch(torch_state_dict, "vgg16")
>>> module, variables = vgg_flax.pretrained("vgg16")      # ImageNet weights, torch optional
"""
from vgg_flax import perf as _perf

# Before JAX starts XLA's worker threads, or they keep glibc's defaults; only where JAX will
# compute on the CPU (what was done and why: HOST_MALLOC): see tune_host_malloc.
HOST_MALLOC = _perf.tune_host_malloc()

from vgg_flax.arch import CFGS, VARIANTS  # noqa: E402
from vgg_flax import losses, lpips
from vgg_flax.checkpoint import CheckpointError, load, save
from vgg_flax.model import VGG
from vgg_flax.nnx import to_nnx
from vgg_flax.preprocess import preprocess
from vgg_flax.pretrained import WeightsUnavailableError, pretrained
from vgg_flax.registry import (VGG11, VGG11_BN, VGG11_LRN, VGG13, VGG13_BN, VGG16, VGG16_BN,
                               VGG16_C, VGG16_SSD, VGG19, VGG19_BN, create, imagenet_categories,
                               list_models, metadata)
from vgg_flax.weights import WeightMismatchError, from_torch, identify, to_torch

__all__ = [
    "CFGS", "CheckpointError", "VARIANTS", "VGG", "VGG11", "VGG11_BN", "VGG11_LRN", "VGG13", "VGG13_BN", "VGG16",
    "VGG16_BN", "VGG16_C", "VGG16_SSD", "VGG19", "VGG19_BN", "WeightMismatchError",
    "WeightsUnavailableError", "create", "from_torch", "identify", "imagenet_categories",
    "list_models", "load", "losses", "lpips", "metadata", "preprocess", "pretrained", "save",
    "to_nnx", "to_torch",
]
