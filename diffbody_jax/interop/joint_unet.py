"""The joint UNet as a flat PyTorch state dict (key names in `diffbody_jax.models.joint_unet`), and the import
of a plain SD UNet checkpoint into a fresh joint UNet."""

from __future__ import annotations

import os
from typing import Any

import jax

from diffbody_jax.interop.mapping import MappingTable, Rule, conv2d, norm
from diffbody_jax.interop.unet import down_block_rules, mid_block_rules, time_embedding_rules, up_block_rules


def joint_unet_table(config) -> MappingTable:
    linear = config.unet.use_linear_projection
    rows = time_embedding_rules() + conv2d("conv_in_branch.*", "conv_in_branch_*")
    rows += down_block_rules("down_blocks_branch.*.*", "down_blocks_branch_*_*", linear)
    rows += down_block_rules("down_blocks.*", "down_blocks_*", linear)
    rows += mid_block_rules(linear)
    rows += up_block_rules("up_blocks.*", "up_blocks_*", linear)
    rows += up_block_rules("up_blocks_branch.*.*", "up_blocks_branch_*_*", linear)
    rows += norm("conv_norm_out_branch.*", "conv_norm_out_branch_*") + conv2d("conv_out_branch.*", "conv_out_branch_*")
    rows += [Rule("fusion_logits", "fusion_logits")]
    return MappingTable(rows)


def joint_unet_from_pretrained_unet(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    seed: int = 0,
    param_dtype: Any = None,
    **config_kwargs,
):
    """A fresh JointUNet initialised from a plain SD UNet checkpoint (a diffusers folder or ours).

    config_kwargs go to `JointUNetConfig.from_unet`: in_channels (8), num_time_ids (0), branches,
    copy_first_n_block, copy_last_n_block. Returns (module, params, copied Flax paths).
    """
    import numpy as np

    from diffbody_jax.interop.pretrained import load_pretrained
    from diffbody_jax.models.joint_unet import JointUNet, JointUNetConfig, joint_unet_from_unet
    from diffbody_jax.models.unet import UNet2DConditionModel

    unet, unet_params = load_pretrained(path, subfolder=subfolder, param_dtype=param_dtype or np.float32)
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"{path}: expected a UNet2DConditionModel, found {type(unet).__name__}")
    joint = JointUNet(JointUNetConfig.from_unet(unet.config, **config_kwargs))
    params, copied = joint_unet_from_unet(unet_params, joint, jax.random.key(seed))
    return joint, params, copied
