"""Colour correction of a restoration toward a reference (I_ir), as DiffBIR and StableSR offer it: off by default.

    fixed = colour_fix(restored, i_ir, "wavelet")       # or "adain"; NHWC in [0, 1], any batch

  adain    per image and channel, the restoration's mean and standard deviation replaced by the reference's:
           (x - mean_x) / std_x * std_r + mean_r (standard deviations with Bessel's correction, +1e-5 inside the
           square root, as StableSR's adaptive_instance_normalization).
  wavelet  an a-trous (stationary) wavelet split into high and low frequencies: `levels` passes of a 3 x 3
           binomial blur (1 2 1)^2 / 16 dilated by 2^i, edges replicated; the result is the restoration's high
           frequencies plus the reference's lowest band, so colour and shading follow the reference while
           detail stays the restoration's.
Both are elementwise / small convolutions: jit them into a pipeline or call them alone. The output is clipped to
[0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
COLOUR_FIX_METHODS = ("none", "adain", "wavelet")


def adain(images: Array, reference: Array, eps: float = 1e-5) -> Array:
    """Per image and channel mean / std matching of [B, H, W, C] `images` to `reference` (any H, W)."""
    def stats(x):
        x = x.astype(jnp.float32)
        n = x.shape[1] * x.shape[2]
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).sum(axis=(1, 2), keepdims=True) / (n - 1)
        return mean, jnp.sqrt(var + eps)

    (m_x, s_x), (m_r, s_r) = stats(images), stats(reference)
    return (images.astype(jnp.float32) - m_x) / s_x * s_r + m_r


def _blur(x: Array, dilation: int) -> Array:
    """(1 2 1)^2 / 16 with holes of `dilation`, edges replicated; x: [B, H, W, C]."""
    k = jnp.asarray([1.0, 2.0, 1.0], jnp.float32) / 4.0
    x = jnp.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)), mode="edge")
    h, w = x.shape[1] - 2 * dilation, x.shape[2] - 2 * dilation
    rows = sum(k[i] * x[:, i * dilation: i * dilation + h] for i in range(3))
    return sum(k[j] * rows[:, :, j * dilation: j * dilation + w] for j in range(3))


def wavelet_split(x: Array, levels: int = 5) -> tuple[Array, Array]:
    """(high, low): the sum of the `levels` detail bands and the remaining low band; high + low == x."""
    low = x.astype(jnp.float32)
    for i in range(levels):
        low = _blur(low, 2**i)
    return x.astype(jnp.float32) - low, low


def wavelet(images: Array, reference: Array, levels: int = 5) -> Array:
    """The restoration's high frequencies + the reference's low band (same size)."""
    if images.shape != reference.shape:
        raise ValueError(f"wavelet colour fix: restoration {images.shape} and reference {reference.shape} differ")
    return wavelet_split(images, levels)[0] + wavelet_split(reference, levels)[1]


def colour_fix(images: Array, reference: Array, method: str = "none") -> Array:
    """`method` of COLOUR_FIX_METHODS applied toward `reference`, clipped to [0, 1] ("none": unchanged)."""
    if method not in COLOUR_FIX_METHODS:
        raise ValueError(f"colour fix {method!r}; expected one of {COLOUR_FIX_METHODS}")
    if method == "none":
        return images
    fixed = adain(images, reference) if method == "adain" else wavelet(images, reference)
    return jnp.clip(fixed, 0.0, 1.0)
