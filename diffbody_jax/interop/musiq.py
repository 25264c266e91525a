"""MUSIQ checkpoints in pyiqa's layout (`musiq_koniq_ckpt-*.pth`, `musiq_ava_ckpt-*.pth`, ...: the official TF
checkpoints converted by pyiqa) -> `models.musiq.MUSIQ` params.

    config, params = read_musiq("musiq_koniq_ckpt-e95806b9.pth")    # architecture read from the shapes

The architecture comes from the tensors: hidden size from `embedding`, MLP width and depth from the encoder
blocks, hash grid and scale count from the embeddings, 10 classes (AVA) or 1 from the head. The head count is
not in the shapes: every published checkpoint uses 64-wide heads (6 at 384), which is the default.
"""

from __future__ import annotations

import os
import re

from diffbody_jax.interop.mapping import CONV_OIHW_TO_HWIO, MappingTable, Rule, linear, nest, norm, torch_to_flax
from diffbody_jax.interop.torch_files import read_state_dict, strip_prefix
from diffbody_jax.models.musiq import MUSIQConfig, init_shapes

HEAD_DIM = 64
_ENCODER = "transformer_encoder"


def musiq_table() -> MappingTable:
    rows = [Rule("conv_root.weight", "conv_root/kernel", CONV_OIHW_TO_HWIO)] + norm("gn_root", "gn_root")
    for conv in ("conv1", "conv2", "conv3", "conv_proj"):
        rows.append(Rule(f"block1.{conv}.weight", f"block1/{conv}/kernel", CONV_OIHW_TO_HWIO))
    for gn in ("gn1", "gn2", "gn3", "gn_proj"):
        rows += norm(f"block1.{gn}", f"block1/{gn}")
    rows += linear("embedding", "embedding")
    rows += [Rule(f"{_ENCODER}.cls", "cls"), Rule(f"{_ENCODER}.posembed_input.position_emb", "position_emb"),
             Rule(f"{_ENCODER}.scaleembed_input.scale_emb", "scale_emb")]
    rows += norm(f"{_ENCODER}.encoder_norm", "encoder_norm")
    block = (norm("norm1", "layer_norm1") + norm("norm2", "layer_norm2") + linear("mlp.fc1", "mlp/fc1")
             + linear("mlp.fc2", "mlp/fc2"))
    for theirs, ours in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("out", "to_out_0")):
        block += linear(f"attention.{theirs}", f"self_attn/{ours}")
    rows += nest(f"{_ENCODER}.transformer.encoderblock_*", "encoder/layers_*", block)
    rows += linear("head", "head") + linear("head.0", "head")  # one score; AVA's Sequential(Linear, Softmax)
    return MappingTable(rows)


def musiq_config(state: dict, num_heads: int | None = None) -> MUSIQConfig:
    """The architecture from a state dict's shapes (module docstring); `num_heads` None: hidden size / 64."""
    try:
        hidden, embed_in = state["embedding.weight"].shape
        block = re.compile(rf"{_ENCODER}\.transformer\.encoderblock_(\d+)\.")
        blocks = {int(m.group(1)) for k in state if (m := block.match(k))}
        mlp = state[f"{_ENCODER}.transformer.encoderblock_0.mlp.fc1.weight"].shape[0]
        grid = round(state[f"{_ENCODER}.posembed_input.position_emb"].shape[1] ** 0.5)
        scales = state[f"{_ENCODER}.scaleembed_input.scale_emb"].shape[0]
        head = state["head.weight"] if "head.weight" in state else state["head.0.weight"]
    except KeyError as e:
        raise ValueError(f"not a MUSIQ checkpoint in pyiqa's layout: no {e.args[0]}") from None
    patch = 4 * round((embed_in / 256) ** 0.5)
    if scales != 3:
        raise ValueError(f"{scales} scale embeddings: the published MUSIQ checkpoints have 3 (longer sides 224, 384 "
                         "and the photo's own size); others need their longer sides, which the weights do not hold")
    return MUSIQConfig(patch_size=patch, hidden_size=hidden, mlp_dim=mlp, num_heads=num_heads or hidden // HEAD_DIM,
                       num_layers=len(blocks), num_scales=scales, grid_size=grid, num_classes=head.shape[0])


def read_musiq(path: str | os.PathLike, num_heads: int | None = None) -> tuple[MUSIQConfig, dict]:
    """(config, params) from a pyiqa-layout MUSIQ file; raises ValueError / ConversionError naming the file and
    every missing, unexpected or misshapen key."""
    state = strip_prefix(read_state_dict(path))
    try:
        config = musiq_config(state, num_heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config, torch_to_flax(state, musiq_table(), init_shapes(config), source=str(path))
