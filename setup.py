"""Builds vgg_flax's one native piece: oneDNN convolutions for XLA:CPU (vgg_flax/onednn.py).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(not x86-64 Linux, no C++17 compiler) the install goes on and vgg_flax runs XLA's own
convolutions, as vgg_flax.onednn.why_unavailable() then says.
"""
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup


def _installed_dir(dist: str, suffix: str, up: int) -> str:
    """The directory ``up`` levels above the file ending in ``suffix`` that ``dist`` installed."""
    for f in importlib.metadata.distribution(dist).files or []:
        if str(f).endswith(suffix):
            return str(Path(f.locate()).resolve().parents[up])
    raise FileNotFoundError(f"{dist} has no {suffix}")


def _onednn_extension() -> list[Extension]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return []
    try:
        includes = [str(Path(importlib.util.find_spec("jaxlib").submodule_search_locations[0],
                             "include")),
                    _installed_dir("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp", 2)]
        libs = _installed_dir("onednn-cpu-gomp", "libdnnl.so.3", 0)
    except (AttributeError, FileNotFoundError, importlib.metadata.PackageNotFoundError) as e:
        print(f"vgg_flax: not building the oneDNN convolutions ({e})", file=sys.stderr)
        return []
    return [Extension(
        "vgg_flax._onednn_conv", ["vgg_flax/csrc/onednn_conv.cc"], include_dirs=includes,
        library_dirs=[libs], libraries=["dnnl"], language="c++",
        # XLA's FFI headers trip -Wreturn-type on switch statements that cover every case.
        extra_compile_args=["-std=c++17", "-O2", "-Wno-return-type"],
        optional=True)]


setup(ext_modules=_onednn_extension())
