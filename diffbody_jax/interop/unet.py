"""Mapping tables of diffusers' UNet2DConditionModel and ControlNetModel <-> ours.

The per-block rows take the block's prefix on each side, so that the ControlNet and the joint UNet
place the same blocks under their own names.
"""

from __future__ import annotations

from diffbody_jax.interop.layers import resnet_rules, timestep_embedding_rules, transformer2d_rules
from diffbody_jax.interop.mapping import MappingTable, Rule, conv2d, nest, norm


def _block_rules(torch_prefix: str, flax_prefix: str, use_linear_projection: bool, sampler: str | None) -> list[Rule]:
    attn = transformer2d_rules(use_linear_projection)
    rows = nest(f"{torch_prefix}.resnets.*", f"{flax_prefix}/resnets_*", resnet_rules())
    rows += nest(f"{torch_prefix}.attentions.*", f"{flax_prefix}/attentions_*", attn)
    if sampler:
        rows += conv2d(f"{torch_prefix}.{sampler}.0.conv", f"{flax_prefix}/{sampler}_0/conv")
    return rows


def down_block_rules(torch_prefix: str, flax_prefix: str, use_linear_projection: bool) -> list[Rule]:
    """A down block (ResNets, attentions, downsampler) at `torch_prefix` / `flax_prefix`, e.g. "down_blocks.*"."""
    return _block_rules(torch_prefix, flax_prefix, use_linear_projection, "downsamplers")


def up_block_rules(torch_prefix: str, flax_prefix: str, use_linear_projection: bool) -> list[Rule]:
    return _block_rules(torch_prefix, flax_prefix, use_linear_projection, "upsamplers")


def mid_block_rules(use_linear_projection: bool) -> list[Rule]:
    return _block_rules("mid_block", "mid_block", use_linear_projection, None)


def time_embedding_rules() -> list[Rule]:
    """time_embedding and SDXL's (or our "time") add_embedding."""
    return (
        nest("time_embedding", "time_embedding", timestep_embedding_rules())
        + nest("add_embedding", "add_embedding", timestep_embedding_rules())
    )


def unet_table(config) -> MappingTable:
    linear = config.use_linear_projection
    rows = conv2d("conv_in", "conv_in") + time_embedding_rules()
    rows += down_block_rules("down_blocks.*", "down_blocks_*", linear)
    rows += mid_block_rules(linear)
    rows += up_block_rules("up_blocks.*", "up_blocks_*", linear)
    rows += norm("conv_norm_out", "conv_norm_out") + conv2d("conv_out", "conv_out")
    return MappingTable(rows)


def controlnet_table(config) -> MappingTable:
    """diffusers' ControlNetModel layout; a latent conditioning embedding has only its `conv_out`; a prior-fusion
    one has a pixel embedding per prior (`controlnet_cond_embedding.<prior>.*`) and its alphas."""
    linear = config.unet.use_linear_projection
    rows = conv2d("conv_in", "conv_in") + time_embedding_rules()
    emb = "controlnet_cond_embedding"
    # one pixel embedding per prior under its name for "prior_fusion", else the single embedding
    fusion = config.conditioning_embedding_type == "prior_fusion"
    for prefix in [f".{n}" for n in config.prior_names] if fusion else [""]:
        t, f = emb + prefix, emb + prefix.replace(".", "/")
        rows += conv2d(f"{t}.conv_in", f"{f}/conv_in") + conv2d(f"{t}.blocks.*", f"{f}/blocks_*")
        rows += conv2d(f"{t}.conv_out", f"{f}/conv_out")
    if fusion:
        rows += [Rule(f"{emb}.alpha", f"{emb}/alpha"), Rule(f"{emb}.alpha_logits", f"{emb}/alpha_logits")]
    rows += down_block_rules("down_blocks.*", "down_blocks_*", linear) + mid_block_rules(linear)
    rows += conv2d("controlnet_down_blocks.*", "controlnet_down_blocks_*")
    rows += conv2d("controlnet_mid_block", "controlnet_mid_block")
    return MappingTable(rows)
