"""AutoencoderKL (the SD / SDXL VAE) in Flax, NHWC, with tiled encode and decode for large images.

    vae = AutoencoderKL(VAEConfig.from_dict(config_json))
    z = vae.apply(params, image, rng, method=AutoencoderKL.encode_latents)     # scaled latents
    image = vae.apply(params, z, method=AutoencoderKL.decode_latents)          # [-1, 1] pixels
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.config import dataclass_from_dict, dataclass_to_dict
from diffbody_jax.models.layers import (
    Array,
    Attention,
    Downsample2D,
    Dtype,
    Precision,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
    remat_block,
)
from diffbody_jax.models.tiling import tiled_map
from diffbody_jax.models.variables import ModelVariables

_FEATURE_OFF = {"act_fn": ("silu",), "latents_mean": (None,), "latents_std": (None,)}
# force_upcast tells diffusers to run the VAE in fp32 under fp16; our bf16 path keeps fp32 statistics.
_IGNORED = ("force_upcast",)
VAE_EPS = 1e-6  # diffusers fixes every VAE norm's eps at 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL, with diffusers' field names and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"VAE config: unsupported block types {bad}")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            raise ValueError("VAE config: down_block_types, up_block_types and block_out_channels differ in length")

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> VAEConfig:
        return dataclass_from_dict(cls, config, kind="VAE", source=source, feature_off=_FEATURE_OFF, ignored=_IGNORED)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self, "AutoencoderKL")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior. mean, logvar: [B, h, w, latent_channels]."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean


class _VAEBase(ModelVariables, nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"
    # Rematerialise every ResNet and attention block in the backward pass: gradients through a 512 x 512
    # decode (part-loss guidance, perceptual losses) then keep only block boundaries alive.
    remat: bool | str = False

    def submodule_kwargs(self) -> dict[str, Any]:
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    attention_backend=self.attention_backend, remat=self.remat)

    def resnet(self, channels: int, name: str) -> ResnetBlock2D:
        g = self.config.norm_num_groups
        cls = remat_block(ResnetBlock2D, self.remat)
        return cls(channels, g, VAE_EPS, 1.0, self.dtype, self.param_dtype, self.precision, name=name)


class SpatialSelfAttention(_VAEBase):
    """GroupNorm, single-head self-attention over all H*W positions, residual. x: [B, H, W, C] -> same."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = group_norm(self, self.config.norm_num_groups, VAE_EPS, "group_norm")(x).reshape(b, h * w, c)
        y = Attention(
            1, c, c, upcast=True, qkv_bias=True, backend=self.attention_backend, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name="attention",
        )(y)
        return x + y.reshape(b, h, w, c)


class VAEMidBlock(_VAEBase):
    """ResNet, self-attention, ResNet at the lowest resolution. x: [B, H, W, C] -> same."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = self.resnet(c, "resnets_0")(x)
        if self.config.mid_block_add_attention:
            attention = remat_block(SpatialSelfAttention, self.remat)
            x = attention(name="attentions_0", **self.submodule_kwargs())(x)
        return self.resnet(c, "resnets_1")(x)


class DownEncoderBlock(_VAEBase):
    """`layers_per_block` ResNets, then a stride-2 conv (bottom/right padded) unless last.

    x: [B, H, W, C_in] -> [B, H/2, W/2, channels] (or [B, H, W, channels] for the last block).
    """

    channels: int = 64
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.config.layers_per_block):
            x = self.resnet(self.channels, f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, 0, self.dtype, self.param_dtype, self.precision, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(_VAEBase):
    """`layers_per_block + 1` ResNets, then nearest x2 and a conv unless last.

    x: [B, H, W, C_in] -> [B, 2H, 2W, channels] (or [B, H, W, channels] for the last block).
    """

    channels: int = 64
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.config.layers_per_block + 1):
            x = self.resnet(self.channels, f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, None, self.dtype, self.param_dtype, self.precision, name="upsamplers_0")(x)
        return x


class Encoder(_VAEBase):
    """Image [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] posterior moments (before quant_conv)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = self.submodule_kwargs()
        x = conv(self, c.block_out_channels[0], 3, "conv_in")(x)
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            x = DownEncoderBlock(channels=channels, add_downsample=i < last, name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(name="mid_block", **kw)(x)
        x = nn.silu(group_norm(self, c.norm_num_groups, VAE_EPS, "conv_norm_out")(x))
        return conv(self, 2 * c.latent_channels, 3, "conv_out")(x)


class Decoder(_VAEBase):
    """Latents [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    @nn.compact
    def __call__(self, z: Array) -> Array:
        c = self.config
        kw = self.submodule_kwargs()
        x = conv(self, c.block_out_channels[-1], 3, "conv_in")(z)
        x = VAEMidBlock(name="mid_block", **kw)(x)
        channels = c.block_out_channels[::-1]
        for i, ch in enumerate(channels):
            x = UpDecoderBlock(channels=ch, add_upsample=i < len(channels) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(self, c.norm_num_groups, VAE_EPS, "conv_norm_out")(x))
        return conv(self, c.out_channels, 3, "conv_out")(x)


class AutoencoderKL(_VAEBase):
    """The KL-regularised autoencoder. Images are in [-1, 1], NHWC; latents are NHWC at 1/f resolution."""

    def setup(self):
        kw = self.submodule_kwargs()
        c = self.config
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        if c.use_quant_conv:
            self.quant_conv = conv(self, 2 * c.latent_channels, 1, None)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(self, c.latent_channels, 1, None)

    def encode(self, x: Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] in [-1, 1]; returns the posterior over [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, latent_channels] unscaled latents; returns [B, h*f, w*f, out_channels]."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, x: Array, rng: jax.Array | None = None) -> Array:
        """Scaled latents as the UNet sees them: (sample or mean - shift_factor) * scaling_factor."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, z: Array) -> Array:
        """Inverse of `encode_latents`' scaling, then decode. z: [B, h, w, C] -> [B, H, W, out_channels]."""
        return self.decode(z / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    def __call__(self, x: Array) -> Array:
        """Reconstruct through the posterior mean. x: [B, H, W, C] -> [B, H, W, out_channels]."""
        return self.decode(self.encode(x).mode())

    # ---------------------------------------------------------------------------------------- init
    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        size = self.config.downsample_factor
        return {"x": jnp.zeros((batch, size, size, self.config.in_channels), self.dtype)}

def latent_scaling_factor(vae: AutoencoderKL, params: dict, images: Sequence[np.ndarray]) -> float:
    """1 / std of the unscaled posterior means of `images` (batches [B, H, W, 3] RGB in [0, 1]), over every latent
    element: LDM's rescaling of a freshly trained autoencoder, so that the latents a diffusion model sees have
    about unit variance (SD's 0.18215 came out of it). Shift-free (shift_factor is left as configured)."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method=AutoencoderKL.encode).mean)
    means = np.concatenate([np.asarray(encode(params, jnp.asarray(x)), np.float64).ravel() for x in images])
    std = float(means.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latent_scaling_factor: the latents' std is {std}; the autoencoder is degenerate")
    return 1.0 / std


# ------------------------------------------------------------------------------------------- tiling
def decode_tiled(vae: AutoencoderKL, params: dict, z: Array, *, tile: int = 64, overlap: int = 16) -> Array:
    """`vae.decode` of unscaled latents z [B, h, w, C] in overlapping latent tiles of `tile` (jittable).

    tile and overlap are in latent pixels (64 and 16 = 512 and 128 image pixels). Inputs no larger than
    one tile decode in one call.
    """
    f = vae.config.downsample_factor
    if z.shape[1] <= tile and z.shape[2] <= tile:
        return vae.apply({"params": params}, z, method=AutoencoderKL.decode)
    decode = lambda t: vae.apply({"params": params}, t, method=AutoencoderKL.decode)  # noqa: E731
    return tiled_map(decode, z, tile, overlap, f)


def encode_tiled(
    vae: AutoencoderKL, params: dict, x: Array, *, tile: int = 512, overlap: int = 128
) -> DiagonalGaussian:
    """`vae.encode` of images x [B, H, W, C] in overlapping image tiles of `tile` pixels (jittable).

    The posterior's mean and logvar are blended across tiles. tile and overlap must be multiples of the
    VAE's down-sampling factor.
    """
    f = vae.config.downsample_factor
    if tile % f or overlap % f:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the VAE factor {f}")
    if x.shape[1] <= tile and x.shape[2] <= tile:
        return vae.apply({"params": params}, x, method=AutoencoderKL.encode)

    def moments(t):
        p = vae.apply({"params": params}, t, method=AutoencoderKL.encode)
        return jnp.concatenate([p.mean, p.logvar], axis=-1)

    return DiagonalGaussian.from_moments(tiled_map(moments, x, tile, overlap, 1.0 / f))


def encode_latents_tiled(vae: AutoencoderKL, params: dict, x: Array, *, tile: int = 512, overlap: int = 128) -> Array:
    """`encode_latents` (posterior mean, shifted and scaled) through `encode_tiled`."""
    z = encode_tiled(vae, params, x, tile=tile, overlap=overlap).mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents_tiled(vae: AutoencoderKL, params: dict, z: Array, *, tile: int = 64, overlap: int = 16) -> Array:
    """`decode_latents` (scaled latents) through `decode_tiled`."""
    return decode_tiled(vae, params, z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0), tile=tile,
                        overlap=overlap)


# ------------------------------------------------------------------------------- images <-> latents
def images_to_latents(vae: AutoencoderKL, params: dict, images: Array, tiles: tuple[int, int] | None = None) -> Array:
    """The one map from images to the latents a diffusion model sees, called by every training loss and pipeline.

    images: [B, H, W, C] RGB in [0, 1], H and W multiples of `vae.config.downsample_factor`. Returns the scaled
    latents [B, H/f, W/f, latent_channels] of the posterior's mode (its mean): training and restoring encode
    alike and deterministically; SD's own fine-tuning scripts draw a posterior sample instead, a difference of
    about exp(logvar / 2) per latent, small for SD's VAE. tiles: (tile, overlap) in image pixels, for large
    images (`encode_tiled`'s blend of posterior moments).
    """
    x = images * 2.0 - 1.0
    if tiles is None:
        return vae.apply({"params": params}, x, method=AutoencoderKL.encode_latents)
    return encode_latents_tiled(vae, params, x, tile=tiles[0], overlap=tiles[1])


def latents_to_images(vae: AutoencoderKL, params: dict, z: Array, tiles: tuple[int, int] | None = None,
                      clip: bool = True) -> Array:
    """The inverse of `images_to_latents`: scaled latents [B, h, w, C] -> RGB [B, h*f, w*f, C] in [0, 1].

    clip: clip to [0, 1] (what a restoration is); part-loss guidance passes False, since a clip would zero the
    gradient at every pixel the x0 estimate overshoots, and early estimates overshoot widely. tiles: (tile, overlap)
    in image pixels, multiples of the VAE factor.
    """
    if tiles is None:
        image = vae.apply({"params": params}, z, method=AutoencoderKL.decode_latents)
    else:
        f = vae.config.downsample_factor
        image = decode_latents_tiled(vae, params, z, tile=tiles[0] // f, overlap=tiles[1] // f)
    image = (image + 1.0) * 0.5
    return jnp.clip(image, 0.0, 1.0) if clip else image
