"""Mapping table of diffusers' UNet2DConditionModel <-> `diffbody_jax.models.unet`."""

from __future__ import annotations

from diffbody_jax.interop.layers import resnet_rules, timestep_embedding_rules, transformer2d_rules
from diffbody_jax.interop.mapping import MappingTable, Rule, conv2d, nest, norm
from diffbody_jax.models.unet import UNetConfig


def unet_block_rules(config: UNetConfig) -> list[Rule]:
    """Rows for the down, mid and up blocks: shared by the UNet and (later) the ControlNet tables."""
    attn = transformer2d_rules(config.use_linear_projection)
    rows: list[Rule] = []
    for side in ("down_blocks", "up_blocks"):
        rows += nest(f"{side}.*.resnets.*", f"{side}_*/resnets_*", resnet_rules())
        rows += nest(f"{side}.*.attentions.*", f"{side}_*/attentions_*", attn)
    rows += conv2d("down_blocks.*.downsamplers.0.conv", "down_blocks_*/downsamplers_0/conv")
    rows += conv2d("up_blocks.*.upsamplers.0.conv", "up_blocks_*/upsamplers_0/conv")
    rows += nest("mid_block.resnets.*", "mid_block/resnets_*", resnet_rules())
    rows += nest("mid_block.attentions.*", "mid_block/attentions_*", attn)
    return rows


def unet_table(config: UNetConfig) -> MappingTable:
    rows = conv2d("conv_in", "conv_in")
    rows += nest("time_embedding", "time_embedding", timestep_embedding_rules())
    rows += nest("add_embedding", "add_embedding", timestep_embedding_rules())
    rows += unet_block_rules(config)
    rows += norm("conv_norm_out", "conv_norm_out") + conv2d("conv_out", "conv_out")
    return MappingTable(rows)
