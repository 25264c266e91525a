"""MUSIQ as an evaluation metric: a no-reference quality score, jitted, on photos in [0, 1].

    metric = MUSIQMetric.from_file("musiq_koniq_ckpt-e95806b9.pth")     # pyiqa's files; nothing is downloaded
    scores = metric(images)                                             # [B, H, W, 3] -> [B], higher is better

The photo's multi-scale representation, as pyiqa's port computes it (`pyiqa/data/multiscale_trans_util.py`): the
photo mapped to [-1, 1], resized with torch's bicubic filter (`evaluation.torch_interpolate`) so its longer side
is 224 and 384 (aspect kept, sides rounded), plus the photo at its own size; each of these cut into 32 x 32
patches after TF "SAME" zero padding, row by row; each patch tagged with its position hashed onto the 10 x 10 grid
(torch's nearest interpolation of 0..9 to the patch counts) and its scale index (0, 1, 2). The official code
resizes with TF's Gaussian filter: scores follow pyiqa's, the implementation restoration papers report.
A KonIQ checkpoint scores roughly 0-100; AVA's 1-10.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.evaluation.torch_interpolate import interpolate
from diffbody_jax.interop.musiq import read_musiq
from diffbody_jax.models.musiq import MUSIQ, MUSIQConfig, same_padding


def hashed_positions(grid: int, rows: int, cols: int) -> np.ndarray:
    """[rows * cols] ids in [0, grid^2): each patch's row and column mapped onto the grid as torch's 'nearest'
    interpolation maps `grid` cells onto `rows` (`cols`): cell floor(i * float32(grid / n))."""
    def cells(n):
        return np.minimum(np.floor(np.arange(n, dtype=np.float32) * (np.float32(grid) / np.float32(n))), grid - 1)
    return (cells(rows)[:, None] * grid + cells(cols)[None, :]).astype(np.int32).reshape(-1)


def _patches(x, p: int):
    """[B, H, W, 3] -> [B, rows * cols, p, p, 3] after TF "SAME" zero padding, row-major."""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), same_padding(h, p, p), same_padding(w, p, p), (0, 0)))
    rows, cols = x.shape[1] // p, x.shape[2] // p
    return x.reshape(b, rows, p, cols, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, rows * cols, p, p, c)


def scale_sizes(h: int, w: int, config: MUSIQConfig) -> list[tuple[int, int]]:
    """The resized (h, w) of each longer side (Python's round, as the reference), in the sorted order."""
    return [(round(h * side / max(h, w)), round(w * side / max(h, w))) for side in sorted(config.longer_side_lengths)]


def multiscale_patches(images, config: MUSIQConfig):
    """[B, H, W, 3] in [0, 1] -> (patches [B, N, p, p, 3] in [-1, 1], spatial ids [N], scale ids [N])."""
    x = (images - 0.5) * 2.0
    h, w = x.shape[1:3]
    p = config.patch_size
    views = [(interpolate(x, size, "bicubic"), size) for size in scale_sizes(h, w, config)] + [(x, (h, w))]
    patches, spatial, scales = [], [], []
    for scale_id, (view, (vh, vw)) in enumerate(views):
        tokens = _patches(view, p)
        ids = hashed_positions(config.grid_size, math.ceil(vh / p), math.ceil(vw / p))
        if scale_id == len(views) - 1 and config.max_seq_len_from_original_res >= 0:
            tokens, ids = tokens[:, :config.max_seq_len_from_original_res], ids[:config.max_seq_len_from_original_res]
        patches.append(tokens)
        spatial.append(ids)
        scales.append(np.full(len(ids), scale_id, np.int32))
    return jnp.concatenate(patches, axis=1), np.concatenate(spatial), np.concatenate(scales)


@functools.partial(jax.jit, static_argnums=0)
def _scores(net: MUSIQ, params, images):
    patches, spatial, scales = multiscale_patches(images, net.config)
    return net.apply({"params": params}, patches, jnp.asarray(spatial), jnp.asarray(scales))


class MUSIQMetric:
    """MUSIQ with a pyiqa-layout checkpoint (module docstring). Higher is better."""

    def __init__(self, config: MUSIQConfig, params):
        self.net, self.params = MUSIQ(config), jax.tree.map(jnp.asarray, params)

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_heads: int | None = None) -> MUSIQMetric:
        return cls(*read_musiq(path, num_heads))

    def __call__(self, images) -> np.ndarray:
        """[B, H, W, 3] RGB in [0, 1] -> [B] scores."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"MUSIQ: expected [B, H, W, 3] images, got {images.shape}")
        return np.asarray(_scores(self.net, self.params, images))
