"""ControlNet's conditioning embedding: a condition image (or latent-size map) -> features at latent resolution.

"pixel" is diffusers' conv stack (conv_in, pairs of 3x3 convs, every second one with stride 2, SiLU between),
which takes an image at 2^(n-1) times the latent size; "latent" is DiffBody's single conv for a condition that
is already at latent resolution. Both end in a zero-initialised conv_out, so a fresh embedding adds nothing.
Used by `ControlNetModel` (one embedding) and `PriorFusion` (one per prior).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffbody_jax.models.layers import Array, conv


class ConditioningEmbedding(nn.Module):
    """Condition -> [B, H, W, out_channels] at latent resolution; see the module docstring for the kinds.

    x: [B, H * s, W * s, C_cond] with s = 2^(len(block_out_channels) - 1) for "pixel", s = 1 for "latent".
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    kind: str = "pixel"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.kind == "pixel":
            x = nn.silu(conv(self, self.block_out_channels[0], 3, "conv_in")(x))
            channels = self.block_out_channels
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
                x = nn.silu(conv(self, c_in, 3, f"blocks_{2 * i}")(x))
                x = nn.silu(conv(self, c_out, 3, f"blocks_{2 * i + 1}", stride=2)(x))
        return conv(self, self.out_channels, 3, "conv_out", zero_init=True)(x)
