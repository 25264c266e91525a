"""HRNet weights: timm / torchreid state dicts <-> `diffbody_jax.models.hrnet` variables.

Our submodule names are the PyTorch paths with indices joined by "_", so each row follows from a Flax
path: `stage2_0/branches_1_3/conv1/kernel` <-> `stage2.0.branches.1.3.conv1.weight`. BatchNorm running
statistics live in the "batch_stats" collection; `num_batches_tracked` is dropped.
"""

from __future__ import annotations

import re

from diffbody_jax.interop.mapping import (
    CONV_OIHW_TO_HWIO,
    IDENTITY,
    LINEAR_T,
    NORM_WEIGHT_TO_SCALE,
    MappingTable,
    Rule,
    flatten_params,
)

_LEAF = {
    ("params", "kernel"): ("weight", CONV_OIHW_TO_HWIO),
    ("params", "scale"): ("weight", NORM_WEIGHT_TO_SCALE),
    ("params", "bias"): ("bias", IDENTITY),
    ("batch_stats", "mean"): ("running_mean", IDENTITY),
    ("batch_stats", "var"): ("running_var", IDENTITY),
}


def torch_key(flax_path: str, ndim: int = 4, renames: dict[str, str] | None = None) -> tuple[str, object]:
    """'params/stage2_0/branches_1_3/conv1/kernel' -> ('stage2.0.branches.1.3.conv1.weight', transform).

    `ndim` tells a Dense kernel (2: transposed) from a conv kernel (4: OIHW <-> HWIO); `renames` maps a
    top-level Flax module name to its PyTorch attribute path."""
    collection, *module, leaf = flax_path.split("/")
    if renames and module and module[0] in renames:
        module[0] = renames[module[0]]
    name, transform = _LEAF[(collection, leaf)]
    if leaf == "kernel" and ndim == 2:
        transform = LINEAR_T
    dotted = re.sub(r"_(\d)", r".\1", ".".join(module))
    return f"{dotted}.{name}", transform


def hrnet_table(variables: dict, prefix: str = "") -> MappingTable:
    """Rows for every leaf of `variables` ({"params", "batch_stats"} or their eval_shape); `prefix` is
    prepended to the PyTorch keys (e.g. a re-id model's "backbone.")."""
    rows = []
    for path, leaf in flatten_params(variables).items():
        key, transform = torch_key(path, len(leaf.shape))
        rows.append(Rule(prefix + key, path, transform))
    return MappingTable(rows, skip=[r"\.num_batches_tracked$"])
