"""MANIQA as an evaluation metric: a no-reference quality score, jitted, on photos in [0, 1].

    metric = MANIQAMetric.from_file("ckpt_koniq10k.pt")                 # pyiqa's files; nothing is downloaded
    metric = MANIQAMetric.from_file("MANIQA_PIPAL-ae6d356b.pth", scale=0.13)
    scores = metric(images)                                             # [B, H, W, 3] -> [B], higher is better

As pyiqa's MANIQA scores a photo in eval mode: mapped to [-1, 1] (its Inception mean and std, 0.5); a photo whose
shorter side is at most 224 is first enlarged with torch's bilinear filter by (224 + 1) / shorter side
(`evaluation.torch_interpolate`); 20 crops of 224 x 224 are taken on a uniform grid (4 rows by 5 columns, the
steps (H - 224) // 4 and (W - 224) // 4); the score is the weighted mean of every crop's per-patch scores, with the
per-patch weights (`models.maniqa`). The photos of a batch are scored one after another (`lax.map`), each with its
20 crops at once.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.evaluation.torch_interpolate import interpolate, output_size
from diffbody_jax.interop.maniqa import read_maniqa
from diffbody_jax.models.maniqa import MANIQA, MANIQAConfig


def crop_origins(h: int, w: int, crop: int, count: int) -> list[tuple[int, int]]:
    """The top-left corners of pyiqa's `uniform_crop`: a ceil(sqrt(count))-wide grid with steps
    (side - crop) // floor(sqrt(count)), row by row, the first `count` of them."""
    per_row = math.ceil(math.sqrt(count))
    step_h, step_w = (h - crop) // math.isqrt(count), (w - crop) // math.isqrt(count)
    return [(i * step_h, j * step_w) for i in range(per_row) for j in range(per_row)][:count]


def crops_of(images, config: MANIQAConfig):
    """[B, H, W, 3] in [0, 1] -> [B, test_sample, S, S, 3] in [-1, 1] (module docstring)."""
    x = (images - 0.5) / 0.5
    s = config.img_size
    h, w = x.shape[1:3]
    if min(h, w) <= s:
        factor = (s + 1) / min(h, w)
        x = interpolate(x, None, "bilinear", scale_factor=factor)
        h, w = output_size(h, factor), output_size(w, factor)
        if min(h, w) < s:
            raise ValueError(f"MANIQA: {images.shape[1:3]} enlarged to {(h, w)}, below the {s} px crop")
    return jnp.stack([x[:, i:i + s, j:j + s] for i, j in crop_origins(h, w, s, config.test_sample)], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _scores(net: MANIQA, params, images):
    def one(crops):  # [n, S, S, 3] -> ()
        score, weight = net.apply({"params": params}, crops)
        return (weight * score).sum() / (weight.sum() + 1e-8)

    return jax.lax.map(one, crops_of(images, net.config))


class MANIQAMetric:
    """MANIQA with a pyiqa-layout checkpoint (module docstring). Higher is better."""

    def __init__(self, config: MANIQAConfig, params):
        self.net, self.params = MANIQA(config), jax.tree.map(jnp.asarray, params)

    @classmethod
    def from_file(cls, path: str | os.PathLike, scale: float = MANIQAConfig.scale,
                  vit_heads: int | None = None) -> MANIQAMetric:
        return cls(*read_maniqa(path, scale, vit_heads))

    def __call__(self, images) -> np.ndarray:
        """[B, H, W, 3] RGB in [0, 1] -> [B] scores."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"MANIQA: expected [B, H, W, 3] images, got {images.shape}")
        return np.asarray(_scores(self.net, self.params, images))
