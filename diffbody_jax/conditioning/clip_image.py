"""CLIP image preprocessing in JAX: resize the short side, centre-crop, normalise (jittable); or pad to a square.

A centre crop of a 2:1 full-body photo keeps its middle half: head and feet are gone. For the colour adapter
(`colour_adapter_features`), `fit="auto"` (the default there) pads tall and wide inputs to a square instead,
with CLIP's mean colour (0 after normalisation), then resizes: the whole body is seen. "auto" pads when the
long side exceeds the short side by more than 10% (a centre crop would drop over 9% of the image) and crops
otherwise. `clip_preprocess` itself defaults to the centre crop, CLIPImageProcessor's behaviour.

Matches transformers' CLIPImageProcessor up to resampling: it resizes uint8 images with PIL's bicubic
filter; we resize in float with `jax.image.resize` (bicubic, antialiased), so values differ by PIL's
rounding to uint8 and the two filters' edge handling (measured bound in tests/conditioning/test_clip_image.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


FITS = ("center_crop", "pad", "auto")
AUTO_PAD_ASPECT = 1.1


def resolve_fit(fit: str, height: int, width: int) -> str:
    """The fit used for an image of this size: "auto" -> "pad" when long / short > AUTO_PAD_ASPECT."""
    if fit not in FITS:
        raise ValueError(f"clip_preprocess: fit={fit!r}; expected one of {FITS}")
    if fit == "auto":
        return "pad" if max(height, width) > AUTO_PAD_ASPECT * min(height, width) else "center_crop"
    return fit


def pad_to_square(x: jax.Array, value=CLIP_MEAN) -> jax.Array:
    """[B, H, W, C] float -> [B, S, S, C], S = max(H, W), centred, the border filled with `value` per channel."""
    b, h, w, c = x.shape
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    canvas = jnp.broadcast_to(jnp.asarray(value, x.dtype), (b, s, s, c))
    return jax.lax.dynamic_update_slice(canvas, x, (0, top, left, 0))


def clip_preprocess(images: jax.Array, size: int = 224, crop: int = 224, fit: str = "center_crop") -> jax.Array:
    """images: [B, H, W, 3], uint8 in [0, 255] or float in [0, 1]; returns [B, crop, crop, 3] float32,
    normalised with CLIP's mean and std, NHWC (what `CLIPVisionModel` takes).

    fit: "center_crop" (CLIPImageProcessor: short side to `size`, centre crop `crop`), "pad" (pad to a square
    with CLIP's mean colour, then resize to `crop`: nothing is cut off), or "auto" (see the module docstring).
    """
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    b, h, w, c = x.shape
    if resolve_fit(fit, h, w) == "pad":
        x = jax.image.resize(pad_to_square(x), (b, crop, crop, c), method="bicubic", antialias=True)
        return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    scale = size / min(h, w)
    # transformers rounds the long side with int(), as get_resize_output_image_size does
    new_h, new_w = (size, int(w * scale)) if h <= w else (int(h * scale), size)
    x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[:, top : top + crop, left : left + crop]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def colour_adapter_features(vision, params, images: jax.Array, size: int | None = None,
                            fit: str = "auto") -> jax.Array:
    """What the colour adapter's Resampler reads: CLIP vision penultimate hidden states of I_res.

    vision: a `CLIPVisionModel` (ViT-H/14 for IP-Adapter-Plus-XL); params: its params; images: [B, H, W, 3]
    uint8 or float in [0, 1]. fit: "auto" (default: tall and wide images, e.g. 2:1 full-body crops, are padded to
    a square so that head and feet stay in view), "pad" or "center_crop". Returns [B, 1 + P, hidden]
    (257 x 1280 for ViT-H/14 at 224). What classifier-free guidance's unconditional pass feeds the adapter is
    the run's contract's `adapter.uncond_image`: "keep" (default: these same features; our training never drops
    the image, so CFG guides the text alone) or "zeros" (the features of an all-zero image in [0, 1], through this
    same function: diffusers' IP-Adapter choice); `pipelines.v2.V2Pipeline.uncond_features`.
    """
    size = size or vision.config.image_size
    pixels = clip_preprocess(images, size=size, crop=size, fit=fit)
    return vision.apply({"params": params}, pixels.astype(vision.dtype))["hidden_states"][-2]
