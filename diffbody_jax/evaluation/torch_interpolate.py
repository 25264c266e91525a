"""Resizing as `torch.nn.functional.interpolate` does it (bilinear and bicubic, align_corners=False, no
antialiasing), in JAX, for the learned metrics whose reference implementations resize that way (MUSIQ's scales,
MANIQA's upscaling of small photos): their scores move with the filter, and `jax.image.resize` is another one (Keys'
cubic with a = -0.5 and antialiasing when shrinking; torch's cubic has a = -0.75 and never antialiases).

    y = interpolate(x, (rh, rw), "bicubic")                   # x [B, H, W, C] -> [B, rh, rw, C]
    y = interpolate(x, None, "bilinear", scale_factor=1.76)   # output floor(H * 1.76) x floor(W * 1.76)

Each axis is one [out, in] matrix built in numpy from the static sizes with torch's float32 index arithmetic
(`area_pixel_compute_source_index`, its index guard and edge clamping) and applied as a matmul at full precision.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = np.float32(-0.75)  # torch's bicubic coefficient
MODES = ("bilinear", "bicubic")


def output_size(n: int, scale_factor: float) -> int:
    """torch's output length for `scale_factor`: floor(n * scale_factor) in double precision."""
    return math.floor(float(n) * scale_factor)


def _cubic_near(x):  # |x| <= 1
    return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _cubic_far(x):  # 1 < |x| < 2
    return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def interpolation_matrix(n_in: int, n_out: int, mode: str, scale_factor: float | None = None) -> np.ndarray:
    """[n_out, n_in] float32 weights of torch's `mode` along one axis; `scale_factor` is the one torch was given
    (it then maps coordinates with 1 / scale_factor, not n_in / n_out)."""
    if mode not in MODES:
        raise ValueError(f"interpolation mode {mode!r}; expected one of {MODES}")
    f32 = np.float32
    scale = f32(1.0 / scale_factor) if scale_factor else f32(n_in) / f32(n_out)
    src = scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    if mode == "bilinear":
        src = np.maximum(src, f32(0))
    index = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - index.astype(f32), f32(0), f32(1))
    if mode == "bilinear":
        taps = np.stack([index, index + (index < n_in - 1)], 1)
        weights = np.stack([f32(1) - t, t], 1)
    else:
        taps = np.clip(index[:, None] + np.arange(-1, 3), 0, n_in - 1)
        weights = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], 1)
    matrix = np.zeros((n_out, n_in), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(n_out), taps.shape[1]), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def interpolate(x, size: tuple[int, int] | None, mode: str, scale_factor: float | None = None):
    """x [B, H, W, C] -> [B, h, w, C] as torch's F.interpolate(NCHW, size or scale_factor, mode) would give."""
    b, h, w, c = x.shape
    if size is None:
        if scale_factor is None:
            raise ValueError("interpolate: give a size or a scale_factor")
        size = (output_size(h, scale_factor), output_size(w, scale_factor))
    mh = jnp.asarray(interpolation_matrix(h, size[0], mode, scale_factor))
    mw = jnp.asarray(interpolation_matrix(w, size[1], mode, scale_factor))
    high = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=high)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=high)
