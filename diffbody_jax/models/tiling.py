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

    Every tile has the same shape, so `fn` compiles once; a `lax.scan` over the tiles slices each one, runs `fn`
    and adds its weighted output into the result, one tile at a time: peak memory is one tile's activations plus
    the input and output, and the program's size does not grow with the number of tiles. Where tiles overlap,
    their outputs are averaged with ramp weights that are zero at the tiles' edges, so no seam shows where they
    meet. Neighbouring tiles share at least `overlap` input pixels, so every output pixel has a non-zero weight.
    """
    if 2 * overlap > tile:
        raise ValueError(f"tile overlap {overlap} must be at most half the tile size {tile}")
    b, h, w, c = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((b, th, tw, c), x.dtype))
    sh, sw, c_out = out.shape[1], out.shape[2], out.shape[3]
    out_h, out_w, ov = round(h * scale), round(w * scale), round(overlap * scale)
    oys, oxs = [round(y * scale) for y in ys], [round(x0 * scale) for x0 in xs]
    # per-row / per-column weights of each tile (static), and their sum over all tiles
    wy = np.stack([blend_weights(oy, sh, ov, out_h) for oy in oys])
    wx = np.stack([blend_weights(ox, sw, ov, out_w) for ox in oxs])
    norm = np.zeros((out_h, out_w), np.float32)
    for i, oy in enumerate(oys):
        for j, ox in enumerate(oxs):
            norm[oy:oy + sh, ox:ox + sw] += np.outer(wy[i], wx[j])
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij"))
    starts = {k: jnp.asarray(v, jnp.int32) for k, v in (("y", ys), ("x", xs), ("oy", oys), ("ox", oxs))}
    wy, wx = jnp.asarray(wy), jnp.asarray(wx)

    def add_tile(acc, ij):
        i, j = ij
        zero = jnp.zeros((), jnp.int32)
        tile_in = jax.lax.dynamic_slice(x, (zero, starts["y"][i], starts["x"][j], zero), (b, th, tw, c))
        weight = (wy[i][:, None] * wx[j][None, :])[None, :, :, None]
        corner = (zero, starts["oy"][i], starts["ox"][j], zero)
        current = jax.lax.dynamic_slice(acc, corner, (b, sh, sw, c_out))
        return jax.lax.dynamic_update_slice(acc, current + fn(tile_in).astype(jnp.float32) * weight, corner), None

    acc = jnp.zeros((b, out_h, out_w, c_out), jnp.float32)
    acc, _ = jax.lax.scan(add_tile, acc, (jnp.asarray(rows), jnp.asarray(cols)))
    return (acc / norm[None, :, :, None]).astype(out.dtype)
