"""The body attention map I_attn of DiffBody v1 (seed 000, Eq. 3): where the body-part network sees a body.

    attn = body_attention_map(net, variables, i_reg)      # i_reg: [B, H, W, 3] RGB in [0, 1]
    attn.latent   # [B, H/8, W/8, 1]: I_attn, the ControlNet condition channel (Eq. 4's condition; Eq. 5
                  # calls it W_a) and the loss weight of Eq. 4 (`diffusion.losses.body_attention_loss`)
    attn.image    # [B, H, W, 1]: the same map at image resolution, for viewing

The network sees I_reg resized to its input size (BPBreID: 384 x 128) and returns the foreground
probability (1 - background) at 1/4 of that; both outputs are bilinear resizes of it back to the image's
aspect, clipped to [0, 1].

Without the part network's weights, `attention_from_mask` makes I_attn from an annotator's person mask
(`diffbody_jax.annotators`, e.g. mediapipe's segmentation) by the same resizes: an approximation of seed 000's
I_attn (a whole-person silhouette rather than the network's foreground of its body parts; docs/annotators.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffbody_jax.models.bodypart import BodyPartNet, preprocess

Array = jax.Array


class BodyAttention(NamedTuple):
    latent: Array  # [B, H / latent_factor, W / latent_factor, 1] in [0, 1]
    image: Array  # [B, H, W, 1] in [0, 1]


def body_attention_map(net: BodyPartNet, variables: dict, image: Array, latent_factor: int = 8) -> BodyAttention:
    """I_attn of an RGB batch in [0, 1] ([B, H, W, 3] with H and W multiples of latent_factor). Jittable."""
    b, h, w, _ = image.shape
    if h % latent_factor or w % latent_factor:
        raise ValueError(f"body_attention_map: image size {h}x{w} is not a multiple of the latent factor "
                         f"{latent_factor}")
    foreground = net.apply(variables, preprocess(image, net.config)).foreground[..., None]

    def resize(size):
        return jnp.clip(jax.image.resize(foreground, (b, *size, 1), "linear"), 0.0, 1.0)

    return BodyAttention(latent=resize((h // latent_factor, w // latent_factor)), image=resize((h, w)))


def attention_from_mask(mask: Array, latent_factor: int = 8) -> BodyAttention:
    """I_attn from a person mask [B, H, W, 1] in [0, 1] (the approximation above): the mask at image resolution
    and its bilinear (antialiased) resize to the latent grid, clipped to [0, 1]. Jittable."""
    b, h, w, _ = mask.shape
    if h % latent_factor or w % latent_factor:
        raise ValueError(f"attention_from_mask: mask size {h}x{w} is not a multiple of the latent factor "
                         f"{latent_factor}")
    mask = jnp.clip(mask.astype(jnp.float32), 0.0, 1.0)
    latent = jax.image.resize(mask, (b, h // latent_factor, w // latent_factor, 1), "linear", antialias=True)
    return BodyAttention(latent=jnp.clip(latent, 0.0, 1.0), image=mask)
