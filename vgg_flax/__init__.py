"""VGG (Simonyan & Zisserman, arXiv 1409.1556) in JAX/Flax, numerically identical to torchvision.

One way for each job:

>>> import vgg_flax
>>> model = vgg_flax.VGG16(num_classes=10)              # build: a Flax Linen module, NHWC
>>> model = vgg_flax.create("vgg16", taps=("relu1_2", "relu4_3"))
>>> variables = vgg_flax.from_torch(torch_state_dict, "vgg16")   # torch weights in memory
>>> module, variables = vgg_flax.pretrained("vgg16")      # published weights, torch optional
>>> vgg_flax.save("ckpt", variables, "vgg16"); module, variables = vgg_flax.load("ckpt")

Weight files: ``vgg_flax.convert.torch_to_flax`` / ``flax_to_torch``. Every weight problem is a
``vgg_flax.WeightsError`` (``vgg_flax/errors.py``). Modules: ``vgg_flax.images`` (image loading
and torchvision's transforms), ``vgg_flax.published`` (where ``pretrained`` looks).
"""
from vgg_flax import perf as _perf

# Before JAX starts XLA's worker threads, or they keep glibc's defaults; only where JAX will
# compute on the CPU (what was done and why: HOST_MALLOC): see tune_host_malloc.
HOST_MALLOC = _perf.tune_host_malloc()

from vgg_flax.arch import CFGS, VARIANTS  # noqa: E402
from vgg_flax import losses, lpips
from vgg_flax.checkpoint import load, save
from vgg_flax.errors import (CheckpointError, ConversionError, WeightFileError,
                             WeightMismatchError, WeightsError, WeightsUnavailableError)
from vgg_flax.images import preprocess
from vgg_flax.model import VGG
from vgg_flax.published import pretrained
from vgg_flax.registry import (VGG11, VGG11_BN, VGG11_LRN, VGG13, VGG13_BN, VGG16, VGG16_BN,
                               VGG16_C, VGG16_SSD, VGG19, VGG19_BN, create, imagenet_categories,
                               list_models, metadata)
from vgg_flax.weights import from_torch, identify, to_torch

__all__ = [
    "CFGS", "CheckpointError", "ConversionError", "HOST_MALLOC", "VARIANTS", "VGG", "VGG11",
    "VGG11_BN", "VGG11_LRN", "VGG13", "VGG13_BN", "VGG16", "VGG16_BN", "VGG16_C", "VGG16_SSD",
    "VGG19", "VGG19_BN", "WeightFileError", "WeightMismatchError", "WeightsError",
    "WeightsUnavailableError", "create", "from_torch", "identify", "imagenet_categories",
    "list_models", "load", "losses", "lpips", "metadata", "nnx", "preprocess", "pretrained", "save",
    "to_nnx", "to_torch",
]

# The NNX front end loads on first use (``vgg_flax.nnx``, ``vgg_flax.to_nnx``): flax.nnx's import
# (~0.3 s on 2 cores) is not paid by the processes that never use it (the CLIs, the trainer).
_LAZY = {"nnx": None, "to_nnx": "to_nnx"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vgg_flax' has no attribute {name!r}")
    import importlib
    module = importlib.import_module("vgg_flax.nnx")
    value = module if _LAZY[name] is None else getattr(module, _LAZY[name])
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
