"""`--fit tile`: a photo restored at its own size on overlapping tiles in every stage (SwinIR, VAE encode and decode,
the diffusion latent), the overlaps blended by `models.tiling.tiled_map`'s ramps.

The diffusion latent follows MultiDiffusion (Bar-Tal et al. 2023): at every sampler step each latent tile is
denoised with its own slice of the condition, and the model outputs are averaged where tiles overlap (here with
ramp weights, zero at a tile's edge), so neighbouring tiles agree on their shared pixels and no seam forms. The
sampler's update then runs on the whole latent. Each tile has the same shape, so the model compiles once and
`lax.map` runs the tiles one after another: peak memory is one tile's activations, whatever the photo's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.body_priors import BodyAttention, body_attention_map
from diffbody_jax.models.tiling import tiled_map

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """size: a tile's side in image pixels; overlap: pixels shared by neighbouring tiles (at most size / 2). Both
    multiples of the VAE factor (and of SwinIR's window x unshuffle factor)."""

    size: int = 512
    overlap: int = 128

    def check(self, factor: int) -> None:
        if self.size % factor or self.overlap % factor:
            raise ValueError(f"tiles: size {self.size} and overlap {self.overlap} must be multiples of the VAE "
                             f"factor {factor}")
        if not 0 < 2 * self.overlap <= self.size:
            raise ValueError(f"tiles: overlap {self.overlap} must be positive and at most half the size {self.size}")


def tiles_for(fit: str, size: int) -> TileConfig | None:
    """`--fit tile`'s tiles, of side `size` overlapping by a quarter of it; None for any other fit."""
    return TileConfig(size, size // 4) if fit == "tile" else None


def space_to_depth(x: Array, f: int) -> Array:
    """[B, H, W, C] -> [B, H/f, W/f, f*f*C]: an image-resolution condition onto the latent grid, exactly."""
    b, h, w, c = x.shape
    return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: Array, f: int, c: int) -> Array:
    b, h, w, _ = x.shape
    return x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, c)


def latent_tiled_eps(eps: Callable, params, z: Array, t: Array, shared, spatial: Sequence[Array], tiles: TileConfig,
                     factor: int, image_factor: Sequence[int] | None = None):
    """MultiDiffusion's model output: `eps(params, z_tile, t, (shared, *spatial_tiles))` on overlapping latent tiles
    of `tiles.size / factor`, blended. spatial: conditions on the latent grid ([B, h, w, C]), or at image resolution
    when image_factor gives their factor (moved onto the latent grid by space_to_depth, back inside each tile);
    shared: conditions without a spatial layout (text), the same for every tile."""
    image_factor = list(image_factor or [1] * len(spatial))
    channels = [z.shape[-1]]
    packed = [z]
    for x, f in zip(spatial, image_factor, strict=True):
        packed.append(space_to_depth(x.astype(z.dtype), f) if f > 1 else x.astype(z.dtype))
        channels.append(packed[-1].shape[-1])
    bounds = [0]
    for c in channels:
        bounds.append(bounds[-1] + c)

    def one_tile(tile):
        parts = [tile[..., bounds[i]: bounds[i + 1]] for i in range(len(channels))]
        conds = [depth_to_space(p, f, x.shape[-1]) if f > 1 else p
                 for p, f, x in zip(parts[1:], image_factor, spatial, strict=True)]
        return eps(params, parts[0], t, (shared, *conds))

    return tiled_map(one_tile, jnp.concatenate(packed, -1), tiles.size // factor, tiles.overlap // factor, 1.0)


def attention_on_small(net, variables, image: Array, factor: int, size: int) -> BodyAttention:
    """The body attention map of a large image, computed on the image scaled so its longer side is `size` (rounded
    to the latent factor) and resized back to latent and image resolution: the part network sees the whole person
    at the scale it was trained at, and a foreground mask is smooth, so nothing is lost that tiles would keep."""
    b, h, w, _ = image.shape
    scale = min(1.0, size / max(h, w))
    small_hw = (max(factor, round(h * scale / factor) * factor), max(factor, round(w * scale / factor) * factor))
    small = jax.image.resize(image, (b, *small_hw, 3), "linear", antialias=True) if small_hw != (h, w) else image
    attn = body_attention_map(net, variables, small, factor)

    def resize(x, hw):
        return jnp.clip(jax.image.resize(x, (b, *hw, 1), "linear"), 0.0, 1.0)

    return BodyAttention(latent=resize(attn.latent, (h // factor, w // factor)), image=resize(attn.image, (h, w)))


# ----------------------------------------------------------------------------------------- strategies
# How a pipeline runs each stage over an image: whole, or on overlapping tiles. The pipelines call the strategy's
# methods and never branch on tiling themselves.
@dataclasses.dataclass(frozen=True)
class WholeImage:
    """Every stage sees the whole image (--fit bucket)."""

    @property
    def image_tiles(self) -> None:
        """(size, overlap) in image pixels for `swinir_regress` / `images_to_latents` / `latents_to_images`."""
        return None

    def check(self, factor: int) -> None:
        del factor

    def eps(self, eps_fn: Callable, params, z: Array, t: Array, shared, spatial: Sequence[Array], factor: int,
            image_factor: Sequence[int] | None = None):
        """eps_fn(params, z, t, (shared, *spatial)) on the whole latent."""
        del factor, image_factor
        return eps_fn(params, z, t, (shared, *spatial))

    def attention(self, net, variables, image: Array, factor: int) -> BodyAttention:
        return body_attention_map(net, variables, image, factor)


@dataclasses.dataclass(frozen=True)
class Tiled:
    """--fit tile: every stage on overlapping tiles of `config.size` pixels (MultiDiffusion over the latent)."""

    config: TileConfig

    @property
    def image_tiles(self) -> tuple[int, int]:
        return (self.config.size, self.config.overlap)

    def check(self, factor: int) -> None:
        self.config.check(factor)

    def eps(self, eps_fn: Callable, params, z: Array, t: Array, shared, spatial: Sequence[Array], factor: int,
            image_factor: Sequence[int] | None = None):
        return latent_tiled_eps(eps_fn, params, z, t, shared, spatial, self.config, factor, image_factor)

    def attention(self, net, variables, image: Array, factor: int) -> BodyAttention:
        return attention_on_small(net, variables, image, factor, self.config.size)


def tiling(tiles: TileConfig | None) -> WholeImage | Tiled:
    """The strategy for an optional TileConfig."""
    return WholeImage() if tiles is None else Tiled(tiles)
