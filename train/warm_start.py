"""Warm start: copy layers from a ``vgg_flax.save`` checkpoint into a fresh training state
(fine-tuning, or the paper's initialisation of a deeper net from net A)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

import vgg_flax
from train import sharding
from train.validation import ConfigError

# The paper (section 3.1): a deeper net starts from net A's first four conv layers and its FCs.
PAPER_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


def _flat(tree) -> dict[str, Any]:
    return {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def warm_start(variables: dict[str, Any], path: str, layers: str = "") -> tuple[dict, list[str]]:
    """``variables`` (params, batch_stats) with layers copied from the vgg_flax checkpoint at
    ``path``. Returns (new variables, notes). See base.py's ``init_from_layers``."""
    _, src = vgg_flax.load(path)
    src_flat = _flat({k: v for k, v in src.items() if k in ("params", "batch_stats")})
    chosen = (PAPER_INIT_LAYERS if layers == "paper"
              else tuple(x.strip() for x in layers.split(",") if x.strip()) if layers else None)
    notes, errors, copied = [], [], set()

    def one(p, leaf):
        name = sharding.path_str(p)
        layer = name.split("/")[1]
        if chosen is not None and layer not in chosen:
            return leaf
        if name not in src_flat:
            errors.append(f"{name} missing")
            return leaf
        value = np.asarray(src_flat[name])
        if value.shape != leaf.shape:
            if chosen is None and layer == "fc8":  # fine-tuning to a new label set
                notes.append(f"fc8 re-initialised ({value.shape} in {path}, {leaf.shape} here)")
                return leaf
            errors.append(f"{name} has shape {value.shape}, expected {leaf.shape}")
            return leaf
        copied.add(layer)
        return value.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(one, variables)
    if chosen is not None:
        errors += [f"layer {c} not in this model" for c in chosen
                   if c not in {n.split("/")[1] for n in _flat(variables)}]
    if errors:
        raise ConfigError(f"init_from {path} does not fit {len(errors)} parameter(s): "
                          f"{'; '.join(errors[:6])}; pick layers with --config.init_from_layers")
    notes.insert(0, f"warm start from {path}: {len(copied)} layers copied")
    return out, notes
