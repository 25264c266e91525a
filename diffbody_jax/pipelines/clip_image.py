"""CLIP image preprocessing in JAX: resize the short side, centre-crop, normalise (jittable).

Matches transformers' CLIPImageProcessor up to resampling: it resizes uint8 images with PIL's bicubic
filter; we resize in float with `jax.image.resize` (bicubic, antialiased), so values differ by PIL's
rounding to uint8 and the two filters' edge handling (measured bound in tests/pipelines/test_clip_image.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: jax.Array, size: int = 224, crop: int = 224) -> jax.Array:
    """images: [B, H, W, 3], uint8 in [0, 255] or float in [0, 1]; returns [B, crop, crop, 3] float32,
    normalised with CLIP's mean and std, NHWC (what `CLIPVisionModel` takes)."""
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    b, h, w, c = x.shape
    scale = size / min(h, w)
    # transformers rounds the long side with int(), as get_resize_output_image_size does
    new_h, new_w = (size, int(w * scale)) if h <= w else (int(h * scale), size)
    x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[:, top : top + crop, left : left + crop]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def colour_adapter_features(vision, params, images: jax.Array, size: int | None = None) -> jax.Array:
    """What the colour adapter's Resampler reads: CLIP vision penultimate hidden states of I_res.

    vision: a `CLIPVisionModel` (ViT-H/14 for IP-Adapter-Plus-XL); params: its params; images: [B, H, W, 3]
    uint8 or float in [0, 1]. Returns [B, 1 + P, hidden] (257 x 1280 for ViT-H/14 at 224). The unconditional
    features for classifier-free guidance are, as in diffusers, those of an all-zero *normalised* input:
    `vision.apply({"params": params}, jnp.zeros_like(pixels))["hidden_states"][-2]`.
    """
    size = size or vision.config.image_size
    pixels = clip_preprocess(images, size=size, crop=size)
    return vision.apply({"params": params}, pixels.astype(vision.dtype))["hidden_states"][-2]
