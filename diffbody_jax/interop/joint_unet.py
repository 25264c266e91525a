"""The joint UNet as a flat PyTorch state dict (key names in `diffbody_jax.models.joint_unet`), and the import
of a plain SD UNet checkpoint into a fresh joint UNet."""

from __future__ import annotations

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
