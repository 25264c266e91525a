"""Mapping rows for the shared blocks of `diffbody_jax.models.layers`, composed by the model tables."""

from __future__ import annotations

from diffbody_jax.interop.mapping import Rule, conv2d, linear, nest, norm


def timestep_embedding_rules() -> list[Rule]:
    return linear("linear_1", "linear_1") + linear("linear_2", "linear_2")


def resnet_rules() -> list[Rule]:
    return (
        norm("norm1", "norm1") + conv2d("conv1", "conv1") + linear("time_emb_proj", "time_emb_proj")
        + norm("norm2", "norm2") + conv2d("conv2", "conv2") + conv2d("conv_shortcut", "conv_shortcut")
    )


def attention_rules() -> list[Rule]:
    qkv = [row for name in ("to_q", "to_k", "to_v") for row in linear(name, name, bias=False)]
    return qkv + linear("to_out.0", "to_out_0")


def transformer_block_rules() -> list[Rule]:
    return (
        norm("norm1", "norm1") + nest("attn1", "attn1", attention_rules())
        + norm("norm2", "norm2") + nest("attn2", "attn2", attention_rules())
        + norm("norm3", "norm3")
        + linear("ff.net.0.proj", "ff/net_0/proj") + linear("ff.net.2", "ff/net_2")
    )


def transformer2d_rules(use_linear_projection: bool) -> list[Rule]:
    # The projections are Linear or 1x1 Conv by config, never guessed from the tensor's rank.
    proj = linear if use_linear_projection else conv2d
    return (
        norm("norm", "norm") + proj("proj_in", "proj_in")
        + nest("transformer_blocks.*", "transformer_blocks_*", transformer_block_rules())
        + proj("proj_out", "proj_out")
    )
