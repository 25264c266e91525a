"""SwinIR weights: official (KAIR) and DiffBIR PyTorch checkpoints <-> `diffbody_jax.models.swinir` params.

    params = load_swinir("003_realSwinIR-M_x4_GAN.pth", config)       # params_ema / params / state_dict
    save_swinir("swinir.pth", config, params)                          # loads strictly in the official class

The official checkpoints also store two derived buffers per Swin layer (`relative_position_index`, and
`attn_mask` for shifted layers at the training patch size); import checks nothing against them and
drops them, export writes them back so that `load_state_dict(strict=True)` accepts the file.
DiffBIR's stage-1 checkpoints name the first conv `conv_first.1` (index 0 is its PixelUnshuffle) and
may prefix every key with `module.`; both are handled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from diffbody_jax.interop import torch_files
from diffbody_jax.interop.mapping import (
    MappingTable,
    Rule,
    conv2d,
    flax_to_torch,
    import_only,
    linear,
    nest,
    norm,
    torch_to_flax,
)
from diffbody_jax.models.swinir import SwinIR, SwinIRConfig, relative_position_index, shifted_window_mask

BUFFERS = (r"\.relative_position_index$", r"\.attn_mask$")


def _residual_conv(torch_name: str, flax_name: str, config: SwinIRConfig) -> list[Rule]:
    if config.resi_connection == "1conv":
        return conv2d(torch_name, f"{flax_name}/0")
    return [row for i in (0, 2, 4) for row in conv2d(f"{torch_name}.{i}", f"{flax_name}/{i}")]


def swin_block_rows(qkv_bias: bool = True) -> list[Rule]:
    """One Swin block (`models.swinir.SwinTransformerBlock`), relative to the block: SwinIR's and MANIQA's."""
    return (
        norm("norm1", "norm1")
        + [Rule("attn.relative_position_bias_table", "attn/relative_position_bias_table")]
        + linear("attn.qkv", "attn/qkv", bias=qkv_bias)
        + linear("attn.proj", "attn/proj")
        + norm("norm2", "norm2")
        + linear("mlp.fc1", "mlp/fc1")
        + linear("mlp.fc2", "mlp/fc2")
    )


def swinir_table(config: SwinIRConfig) -> MappingTable:
    block = swin_block_rows(config.qkv_bias)
    rows = conv2d("conv_first.1" if config.unshuffle_scale > 1 else "conv_first", "conv_first")
    if config.unshuffle_scale > 1:  # spandrel and other ports drop the Sequential index: read that too
        rows += import_only(conv2d("conv_first", "conv_first"))
    rows += norm("patch_embed.norm", "patch_embed_norm") + [Rule("absolute_pos_embed", "absolute_pos_embed")]
    rows += nest("layers.*.residual_group.blocks.*", "layers_*/residual_group/blocks_*", block)
    rows += nest("layers.*", "layers_*", _residual_conv("conv", "conv", config))
    rows += norm("norm", "norm") + _residual_conv("conv_after_body", "conv_after_body", config)
    rows += conv2d("conv_before_upsample.0", "conv_before_upsample_0") + conv2d("upsample.*", "upsample_*")
    for name in ("conv_up1", "conv_up2", "conv_up3", "conv_hr", "conv_last"):
        rows += conv2d(name, name)
    return MappingTable(rows, skip=BUFFERS)


def swinir_from_state_dict(
    state_dict: dict[str, np.ndarray], config: SwinIRConfig, source: str = "SwinIR state dict", dtype: Any = None
) -> dict:
    """Flat PyTorch state dict -> Flax params; every key must map and every param be filled."""
    state_dict = torch_files.strip_prefix(state_dict)
    return torch_to_flax(state_dict, swinir_table(config), SwinIR(config).param_shapes(), source, dtype)


def load_swinir(path: str | os.PathLike, config: SwinIRConfig, dtype: Any = None) -> dict:
    """Params from an official `.pth` (params_ema preferred over params), a DiffBIR `.ckpt`, or safetensors."""
    return swinir_from_state_dict(torch_files.read_state_dict(path), config, str(path), dtype)


def swinir_state_dict(config: SwinIRConfig, params: dict, buffers: bool = True) -> dict[str, np.ndarray]:
    """Flax params -> flat PyTorch state dict; with `buffers`, the official derived buffers too."""

    out = flax_to_torch(params, swinir_table(config), "SwinIR params")
    if buffers:
        ws, res = config.attention_window, config.patches_resolution
        index = relative_position_index(ws)
        mask = shifted_window_mask(res, res, ws, ws // 2) if config.shifts else None
        for i, depth in enumerate(config.depths):
            for j in range(depth):
                prefix = f"layers.{i}.residual_group.blocks.{j}"
                out[f"{prefix}.attn.relative_position_index"] = index
                if j % 2 and mask is not None:
                    out[f"{prefix}.attn_mask"] = mask
    return out


def save_swinir(path: str | os.PathLike, config: SwinIRConfig, params: dict) -> None:
    """Write a checkpoint the PyTorch code loads strictly: `.pth` as {"params": state_dict} (KAIR's
    layout; DiffBIR's loader takes a plain dict, which `.safetensors` and `.ckpt` give), or safetensors."""
    path = Path(path)
    state_dict = swinir_state_dict(config, params)
    if path.suffix == ".safetensors":
        torch_files.write_safetensors(state_dict, path)
        return
    if path.suffix not in (".pth", ".pt", ".ckpt", ".bin"):
        raise ValueError(f"{path}: unknown SwinIR checkpoint suffix (.pth, .pt, .ckpt, .bin or .safetensors)")
    torch_files.write_torch({"params": state_dict} if path.suffix in (".pth", ".pt") else state_dict, path)
