"""Full-reference image metrics of the DiffBody papers, in JAX, batched: PSNR, SSIM, CPSNR, CSSIM.

    scores = image_metrics(restored, ground_truth)      # NHWC RGB in [0, 1] -> {"psnr": [B], "ssim": [B], ...}

Neither paper defines them. Our reading, the convention of the restoration literature the papers compare with
(BasicSR, DiffBIR's evaluation):
  psnr, ssim    on the luma channel Y of ITU-R BT.601 (studio range, Y in [16/255, 235/255]), as BasicSR's
                `test_y_channel=True`;
  cpsnr         PSNR over the three RGB channels together (one MSE over all of them): "colour PSNR";
  cssim         the mean over R, G and B of each channel's SSIM: "colour SSIM".
SSIM is Wang et al. 2004's: an 11 x 11 Gaussian window of sigma 1.5 (scikit-image's truncate=3.5), K1 = 0.01,
K2 = 0.03, population (not sample) covariances, averaged over the positions where the window fits (scikit-image's
`structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)`, which the tests match within
1e-4). No border is cropped; images must be the same size and at least 11 pixels on each side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# BT.601 studio-range luma from RGB in [0, 1]: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
_Y_OFFSET = 16.0 / 255.0
SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5


def luma(images: Array) -> Array:
    """[B, H, W, 3] RGB in [0, 1] -> [B, H, W, 1] BT.601 Y in [16/255, 235/255]."""
    return (images.astype(jnp.float32) @ jnp.asarray(_Y_WEIGHTS, jnp.float32))[..., None] + _Y_OFFSET


def psnr(a: Array, b: Array, data_range: float = 1.0) -> Array:
    """Per image over all pixels and channels: 10 log10(range^2 / MSE). [B, H, W, C] x 2 -> [B]."""
    _check(a, b, "psnr")
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _filter(x: Array, window: np.ndarray) -> Array:
    """Separable 'valid' filtering of [N, H, W] by the 1-D window along H then W."""
    k = jnp.asarray(window, jnp.float32)
    n = k.shape[0]
    x = x[:, None]  # [N, 1, H, W]
    x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, n, 1), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, 1, n), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    return x[:, 0]


def ssim(a: Array, b: Array, data_range: float = 1.0) -> Array:
    """Mean SSIM per image and channel, averaged over channels: [B, H, W, C] x 2 -> [B]."""
    _check(a, b, "ssim")
    bsz, h, w, c = a.shape
    window = _gaussian_window()
    if min(h, w) < window.size:
        raise ValueError(f"ssim: images of {h} x {w} are smaller than the {window.size}-pixel window")
    to_planes = lambda x: jnp.moveaxis(x.astype(jnp.float32), -1, 1).reshape(bsz * c, h, w)  # noqa: E731
    x, y = to_planes(a), to_planes(b)
    mx, my = _filter(x, window), _filter(y, window)
    vx = _filter(x * x, window) - mx * mx
    vy = _filter(y * y, window) - my * my
    cxy = _filter(x * y, window) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2)).reshape(bsz, c).mean(axis=1)


def _check(a: Array, b: Array, name: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{name}: expected two [B, H, W, C] arrays of one shape, got {a.shape} and {b.shape}")


@jax.jit
def image_metrics(restored: Array, target: Array) -> dict[str, Array]:
    """{"psnr", "ssim" (on Y), "cpsnr", "cssim" (on RGB)}, each [B], for NHWC RGB images in [0, 1]."""
    y_r, y_t = luma(restored), luma(target)
    return {"psnr": psnr(y_r, y_t), "ssim": ssim(y_r, y_t), "cpsnr": psnr(restored, target),
            "cssim": ssim(restored, target)}
