"""Mapping table of diffusers' AutoencoderKL <-> `diffbody_jax.models.vae`."""

from __future__ import annotations

from diffbody_jax.interop.layers import resnet_rules
from diffbody_jax.interop.mapping import MappingTable, Rule, conv2d, import_only, linear, nest, norm
from diffbody_jax.models.vae import VAEConfig


def spatial_attention_rules() -> list[Rule]:
    rows = norm("group_norm", "group_norm")
    for name in ("to_q", "to_k", "to_v"):
        rows += linear(name, f"attention/{name}")
    rows += linear("to_out.0", "attention/to_out_0")
    # diffusers < 0.14 saved the VAE attention as query/key/value/proj_attn (SD2.1's files still do);
    # read them, always write the current names.
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
    for old, new in legacy.items():
        rows += import_only(linear(old, f"attention/{new}"))
    return rows


def _half(side: str, blocks: str, sampler: str) -> list[Rule]:
    rows = conv2d("conv_in", "conv_in")
    rows += nest(f"{blocks}.*.resnets.*", f"{blocks}_*/resnets_*", resnet_rules())
    rows += conv2d(f"{blocks}.*.{sampler}.0.conv", f"{blocks}_*/{sampler}_0/conv")
    rows += nest("mid_block.resnets.*", "mid_block/resnets_*", resnet_rules())
    rows += nest("mid_block.attentions.0", "mid_block/attentions_0", spatial_attention_rules())
    rows += norm("conv_norm_out", "conv_norm_out") + conv2d("conv_out", "conv_out")
    return nest(side, side, rows)


def vae_table(config: VAEConfig) -> MappingTable:
    del config  # one layout for every AutoencoderKL config
    rows = _half("encoder", "down_blocks", "downsamplers") + _half("decoder", "up_blocks", "upsamplers")
    rows += conv2d("quant_conv", "quant_conv") + conv2d("post_quant_conv", "post_quant_conv")
    return MappingTable(rows)
