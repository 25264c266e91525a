"""BPBreID weights: torchreid checkpoints <-> `diffbody_jax.models.bodypart` variables, and HRNet-W32
ImageNet weights (timm / HRNet-Image-Classification layout) into the backbone.

torchreid's BPBreID names its backbone `backbone_appearance_feature_extractor` (whose 1x1 conv head is
`.cls_head`); every other head module has the attribute name our Flax module has, so each key follows from
a Flax path (see `interop/hrnet.py`). A checkpoint is torchreid's {"state_dict": ..., "epoch": ...}, a bare
state dict, or either with DataParallel's `module.` prefix.

    config, variables = load_bodypart("bpbreid_market1501_hrnet32_10642.pth")
    variables = backbone_from_imagenet(read_state_dict("hrnetv2_w32_imagenet_pretrained.pth"), variables)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffbody_jax.interop import torch_files
from diffbody_jax.interop.hrnet import hrnet_table, torch_key
from diffbody_jax.interop.mapping import MappingTable, Rule, flatten_params, flax_to_torch, torch_to_flax
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet

BACKBONE = "backbone_appearance_feature_extractor"
RENAMES = {"backbone": BACKBONE, "backbone_cls_head": f"{BACKBONE}.cls_head"}
# The ImageNet classifier's head beyond the incre modules; BPBreID drops it (its load_param does too).
IMAGENET_HEAD = (r"^downsamp_modules\.", r"^final_layer\.", r"^classifier\.", r"^fc\.")


def bodypart_table(variables: dict) -> MappingTable:
    """Rows for every leaf of BodyPartNet `variables` (or their eval_shape)."""
    rows = []
    for path, leaf in flatten_params(variables).items():
        key, transform = torch_key(path, len(leaf.shape), RENAMES)
        rows.append(Rule(key, path, transform))
    return MappingTable(rows, skip=[r"\.num_batches_tracked$"])


def infer_config(state_dict: dict[str, np.ndarray], base: BodyPartConfig | None = None) -> BodyPartConfig:
    """The head fields of a BPBreID checkpoint, read from its keys and shapes, on top of `base` (whose
    backbone and input convention are kept): number of parts, reduction mode and width, identities."""
    sd = torch_files.strip_prefix(state_dict)
    base = base or BodyPartConfig()
    try:
        num_parts = sd["pixel_classifier.classifier.weight"].shape[0] - 1
    except KeyError:
        raise ValueError("not a BPBreID state dict: no 'pixel_classifier.classifier.weight' key") from None
    if "global_after_pooling_dim_reduce.layers.0.weight" in sd:
        dim_reduce, embed_dim = "after_pooling", sd["global_after_pooling_dim_reduce.layers.0.weight"].shape[0]
    elif "before_pooling_dim_reduce.layers.0.weight" in sd:
        dim_reduce, embed_dim = "before_pooling", sd["before_pooling_dim_reduce.layers.0.weight"].shape[0]
    else:
        dim_reduce, embed_dim = "none", sd[f"{BACKBONE}.cls_head.0.weight"].shape[0]
    classifier = sd.get("global_identity_classifier.classifier.weight")
    names = base.part_names if len(base.part_names) == num_parts else tuple(f"part{i}" for i in range(num_parts))
    return dataclasses.replace(
        base, part_names=names, dim_reduce=dim_reduce, embed_dim=int(embed_dim),
        num_identities=0 if classifier is None else int(classifier.shape[0]),
        shared_parts_id_classifier="parts_identity_classifier.bn.weight" in sd)


def bodypart_from_state_dict(
    state_dict: dict[str, np.ndarray], config: BodyPartConfig, source: str = "BPBreID state dict", dtype: Any = None
) -> dict:
    """Flat torchreid state dict -> {"params", "batch_stats"}; every key must map, every leaf be filled."""
    shapes = BodyPartNet(config=config).variable_shapes()
    return torch_to_flax(torch_files.strip_prefix(state_dict), bodypart_table(shapes), shapes, source, dtype)


def load_bodypart(
    path: str | os.PathLike, config: BodyPartConfig | None = None, dtype: Any = None
) -> tuple[BodyPartConfig, dict]:
    """(config, variables) from a torchreid BPBreID checkpoint (.pth / .pth.tar / .safetensors). Without
    `config`, the head is read from the checkpoint over the published W32 backbone (`infer_config`)."""
    state_dict = torch_files.strip_prefix(torch_files.read_state_dict(path))
    config = config or infer_config(state_dict)
    return config, bodypart_from_state_dict(state_dict, config, str(path), dtype)


def bodypart_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """Variables -> torchreid's flat state dict (BatchNorm counters included, so it loads strictly)."""

    out = flax_to_torch(variables, bodypart_table(variables), "BodyPartNet variables")
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def save_bodypart(path: str | os.PathLike, variables: dict) -> None:
    """torchreid's checkpoint layout ({"state_dict": ...} in .pth / .pth.tar), or flat .safetensors."""
    path = Path(path)
    state_dict = bodypart_state_dict(variables)
    if path.suffix == ".safetensors":
        torch_files.write_safetensors(state_dict, path)
        return
    if path.suffix not in (".pth", ".pt", ".tar"):
        raise ValueError(f"{path}: unknown BPBreID checkpoint suffix (.pth, .pth.tar, .pt or .safetensors)")
    torch_files.write_torch({"state_dict": state_dict}, path)


def imagenet_table(backbone: dict) -> MappingTable:
    """HRNet ImageNet keys (`conv1.weight`, `incre_modules.0.0.conv1.weight`, ...) <-> the "backbone"
    subtree of BodyPartNet variables ({collection: {"backbone": ...}}); the classifier head is skipped."""
    rows = [Rule(r.torch.removeprefix("backbone."), r.flax, r.transform) for r in hrnet_table(backbone).rules]
    return MappingTable(rows, skip=[r"\.num_batches_tracked$", *IMAGENET_HEAD])


def backbone_from_imagenet(state_dict: dict[str, np.ndarray], variables: dict, source: str = "HRNet ImageNet") -> dict:
    """Replace the backbone of BodyPartNet `variables` with HRNet ImageNet weights (timm's `hrnet_w32` or
    HRNet-Image-Classification's file; a BPBreID checkpoint's backbone keys work too). The ImageNet
    classifier head is dropped; every backbone leaf must be filled. The part head is left as it was."""
    sd = torch_files.strip_prefix(state_dict)
    if any(k.startswith(BACKBONE + ".") for k in sd):
        sd = {k[len(BACKBONE) + 1:]: v for k, v in sd.items() if k.startswith(BACKBONE + ".")}
        sd = {k: v for k, v in sd.items() if not k.startswith("cls_head.")}
    backbone = {c: {"backbone": tree["backbone"]} for c, tree in variables.items()}
    loaded = torch_to_flax(sd, imagenet_table(backbone), backbone, source)
    return {c: {**tree, "backbone": loaded[c]["backbone"]} for c, tree in variables.items()}
