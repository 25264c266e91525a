"""MANIQA checkpoints in pyiqa's layout (`ckpt_koniq10k.pt`, `MANIQA_PIPAL-*.pth`, `ckpt_kadid10k.pt`: the whole
network, timm's ViT-B/8 included, as pyiqa loads it) -> `models.maniqa.MANIQA` params.

    config, params = read_maniqa("ckpt_koniq10k.pt", scale=0.8)     # architecture read from the shapes

The architecture comes from the tensors (ViT width and patch from `vit.patch_embed`, crop size from `vit.pos_embed`,
Swin depths, heads and window from the relative position tables, MLP widths from `fc1`); the ViT's head count is
not in the shapes and is width / 64 (12 for ViT-B). `scale`, the Swin stages' residual weight, is not in the weights
either: 0.8 for KonIQ and KADID, 0.13 for PIPAL, as pyiqa sets them.

What the score never reads is dropped by name: timm's blocks after the last feature block, its final norm and
classifier, each Swin stage's unused `downsample` conv, and the derived buffers (`relative_position_index`,
`attn_mask`). timm's fused `attn.qkv` is split into our q, k and v projections.
"""

from __future__ import annotations

import os
import re

import numpy as np

from diffbody_jax.interop.mapping import (
    CONV_OIHW_TO_HWIO,
    MappingTable,
    Rule,
    conv2d,
    linear,
    nest,
    norm,
    torch_to_flax,
)
from diffbody_jax.interop.swinir import BUFFERS, swin_block_rows
from diffbody_jax.interop.torch_files import read_state_dict, strip_prefix
from diffbody_jax.models.maniqa import MANIQAConfig, init_shapes

HEAD_DIM = 64
_BLOCK = re.compile(r"^vit\.blocks\.(\d+)\.")


def maniqa_table(config: MANIQAConfig) -> MappingTable:
    rows = [Rule("vit.patch_embed.proj.weight", "vit/patch_embed/kernel", CONV_OIHW_TO_HWIO),
            Rule("vit.patch_embed.proj.bias", "vit/patch_embed/bias"),
            Rule("vit.cls_token", "vit/cls_token"), Rule("vit.pos_embed", "vit/pos_embed")]
    block = norm("norm1", "layer_norm1") + norm("norm2", "layer_norm2") + linear("attn.proj", "self_attn/to_out_0")
    for theirs, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
        block += linear(f"attn.{theirs}", f"self_attn/{ours}")
    block += linear("mlp.fc1", "mlp/fc1") + linear("mlp.fc2", "mlp/fc2")
    rows += nest("vit.blocks.*", "vit/encoder/layers_*", block)
    for stage in (1, 2):
        for proj in ("c_q", "c_k", "c_v"):
            rows += linear(f"tablock{stage}.*.{proj}", f"tablock{stage}_*/{proj}")
        rows += conv2d(f"conv{stage}", f"conv{stage}")
        rows += nest(f"swintransformer{stage}.layers.*.blocks.*", f"swintransformer{stage}/layers_*/blocks_*",
                     swin_block_rows())
        rows += conv2d(f"swintransformer{stage}.layers.*.conv", f"swintransformer{stage}/layers_*/conv")
    for head in ("fc_score", "fc_weight"):
        rows += linear(f"{head}.0", f"{head}_0") + linear(f"{head}.3", f"{head}_3")
    skip = BUFFERS + (r"^vit\.(norm|fc_norm|head)\.", r"^swintransformer\d\.downsample\.")
    return MappingTable(rows, skip=skip)


def prepare_state(state: dict, config: MANIQAConfig) -> dict:
    """pyiqa's keys -> the table's: ViT blocks after the last feature block dropped, timm's fused qkv split into
    q, k, v (works on shape-only arrays too)."""
    out = {}
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block and int(block.group(1)) > max(config.feature_blocks):
            continue
        fused = re.match(r"^(vit\.blocks\.\d+\.attn)\.qkv\.(weight|bias)$", key)
        if fused:
            for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0), strict=True):
                out[f"{fused.group(1)}.{name}.{fused.group(2)}"] = part
        else:
            out[key] = value
    return out


def maniqa_config(state: dict, scale: float = MANIQAConfig.scale, vit_heads: int | None = None) -> MANIQAConfig:
    """The architecture from a state dict's shapes (module docstring)."""
    try:
        width, _, patch, _ = state["vit.patch_embed.proj.weight"].shape
        tokens = state["vit.pos_embed"].shape[1] - 1
        vit_mlp = state["vit.blocks.0.mlp.fc1.weight"].shape[0]
        table = state["swintransformer1.layers.0.blocks.0.attn.relative_position_bias_table"]
        layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"swintransformer1\.layers\.(\d+)\.", k))})
        depths = tuple(len({k.split(".")[4] for k in state if k.startswith(f"swintransformer1.layers.{i}.blocks.")})
                       for i in layers)
        heads = tuple(state[f"swintransformer1.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]
                      for i in layers)
        dim_mlp = state["swintransformer1.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        outputs = state["fc_score.3.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a MANIQA checkpoint in pyiqa's layout: no {e.args[0]}") from None
    vit_blocks = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    need = max(MANIQAConfig.feature_blocks) + 1
    if vit_blocks < need:
        raise ValueError(f"the ViT has {vit_blocks} blocks; MANIQA reads the tokens of blocks "
                         f"{MANIQAConfig.feature_blocks}, so it needs at least {need}")
    return MANIQAConfig(embed_dim=width, vit_heads=vit_heads or width // HEAD_DIM, vit_mlp=vit_mlp, patch_size=patch,
                        img_size=round(tokens ** 0.5) * patch,
                        num_tab=len({k.split(".")[1] for k in state if k.startswith("tablock1.")}),
                        depths=depths, num_heads=heads, window_size=(round(table.shape[0] ** 0.5) + 1) // 2,
                        dim_mlp=dim_mlp, scale=scale, num_outputs=outputs)


def read_maniqa(path: str | os.PathLike, scale: float = MANIQAConfig.scale,
                vit_heads: int | None = None) -> tuple[MANIQAConfig, dict]:
    """(config, params) from a pyiqa-layout MANIQA file; raises ValueError / ConversionError naming the file and
    every missing, unexpected or misshapen key."""
    state = strip_prefix(read_state_dict(path))  # DataParallel's "module."
    try:
        config = maniqa_config(state, scale, vit_heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config, torch_to_flax(prepare_state(state, config), maniqa_table(config), init_shapes(config),
                                 source=str(path))
