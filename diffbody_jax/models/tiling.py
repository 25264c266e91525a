"""Overlapping tiles with blended seams: one implementation for every stage that runs on tiles (the VAE's tiled
encode and decode, the restoration pipelines' `--fit tile`: SwinIR, and the diffusion latent MultiDiffusion-style).

    out = tiled_map(fn, x, tile=64, overlap=16, scale=1.0)   # fn: [B, T, T, C] -> [B, T*scale, T*scale, C']
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.models.layers import Array


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of full-size tiles covering [0, length) with at least `overlap` shared between neighbours."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_weights(start: int, size: int, overlap: int, total: int) -> np.ndarray:
    """1-D weight of one tile's output along one axis.

    On each side that has a neighbour, the outer quarter of the overlap gets weight 0 (a tile's own zero
    padding corrupts its edge pixels), and the rest of the overlap ramps linearly from 0 to 1.
    """
    w = np.ones(size, np.float32)
    if overlap > 0:
        margin = overlap // 4
        ramp = np.zeros(overlap, np.float32)
        ramp[margin:] = (np.arange(overlap - margin, dtype=np.float32) + 1) / (overlap - margin + 1)
        if start > 0:
            w[:overlap] = ramp
        if start + size < total:
            w[size - overlap:] = np.minimum(w[size - overlap:], ramp[::-1])
    return w


def tiled_map(fn, x: Array, tile: int, overlap: int, scale: float) -> Array:
    """Apply `fn` ([B, T, T, C] -> [B, T*scale, T*scale, C']) to overlapping tiles of x and blend them.

    Every tile has the same shape, so `fn` compiles once and runs under `lax.map`, one tile at a time:
    peak memory is one tile's activations. Where tiles overlap, their outputs are averaged with ramp
    weights that are zero at the tiles' edges, so no seam shows where they meet. Neighbouring tiles share
    at least `overlap` input pixels, so every output pixel has a non-zero total weight.
    """
    if 2 * overlap > tile:
        raise ValueError(f"tile overlap {overlap} must be at most half the tile size {tile}")
    b, h, w, _ = x.shape
    th, tw = min(tile, h), min(tile, w)
    positions = [(y, x0) for y in tile_starts(h, th, overlap) for x0 in tile_starts(w, tw, overlap)]
    tiles = jnp.stack([x[:, y:y + th, x0:x0 + tw] for y, x0 in positions])
    outs = jax.lax.map(fn, tiles)  # [n, B, th * scale, tw * scale, C']
    sh, sw = outs.shape[2], outs.shape[3]
    out_h, out_w, ov = round(h * scale), round(w * scale), round(overlap * scale)
    acc = jnp.zeros((b, out_h, out_w, outs.shape[-1]), jnp.float32)
    norm = np.zeros((out_h, out_w), np.float32)
    for k, (y, x0) in enumerate(positions):
        oy, ox = round(y * scale), round(x0 * scale)
        wgt = np.outer(blend_weights(oy, sh, ov, out_h), blend_weights(ox, sw, ov, out_w))
        acc = acc.at[:, oy:oy + sh, ox:ox + sw].add(outs[k].astype(jnp.float32) * wgt[None, :, :, None])
        norm[oy:oy + sh, ox:ox + sw] += wgt
    return (acc / norm[None, :, :, None]).astype(outs.dtype)
