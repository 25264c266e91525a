"""SwinIR (Liang et al. 2021), the stage-0 restorer that turns a degraded photo into I_ir. NHWC inside.

    model = SwinIR(SwinIRConfig(...))
    restored = model.apply({"params": params}, image)        # image [B, H, W, C] in [0, 1]

The architecture is the official one: a 3x3 conv, groups of Swin layers (RSTB: shifted-window attention
with a learned relative position bias, each group closed by a conv and a residual), a conv after the
body, and one of four reconstruction heads chosen by `upsampler`:

  ""                    denoising / JPEG: the output is the input plus a residual, same size
  "pixelshuffle"        classical SR: conv + LeakyReLU, (conv, PixelShuffle(2)) per factor 2, conv
  "pixelshuffledirect"  lightweight SR: one conv to scale**2 * C channels and one PixelShuffle
  "nearest+conv"        real-world SR: (nearest x2, conv, LeakyReLU) per factor 2

DiffBIR's stage-1 variant (`unshuffle_scale` > 1) pixel-unshuffles the input first, so a 512x512 image
runs at 64x64 inside and an x8 head brings it back to 512x512. Any input size works: the image is
reflect-padded to the window multiple (times the unshuffle factor) and the output is cropped back.

Submodule names are the PyTorch attribute paths with "." -> "/" and list indices joined by "_"
(`layers_0/residual_group/blocks_1/attn/qkv`), so the weight mapping is a renaming.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.config import dataclass_from_dict, dataclass_to_dict
from diffbody_jax.models.attention import attention_backend
from diffbody_jax.models.layers import (
    MLP,
    Array,
    Dtype,
    Precision,
    conv,
    dense,
    layer_norm,
    remat_block,
)
from diffbody_jax.models.tiling import tiled_map
from diffbody_jax.models.variables import ModelVariables

UPSAMPLERS = ("", "pixelshuffle", "pixelshuffledirect", "nearest+conv")
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # the DIV2K mean the official models subtract
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every SwinIR norm
MASK_VALUE = -100.0  # what the official shifted-window mask adds between regions (not -inf)
NUM_FEAT = 64  # channels of the official reconstruction heads, fixed in the architecture
_trunc_normal = nn.initializers.truncated_normal(0.02)  # the official init of Linear weights and bias tables


@dataclasses.dataclass(frozen=True)
class SwinIRConfig:
    """Architecture of a SwinIR, with the official constructor's field names and defaults.

    `img_size` is the training patch size: it only fixes the size of the `attn_mask` buffers that the
    official code stores in its checkpoints, and shrinks the window when an image is smaller than one.
    `unshuffle_scale` > 1 is DiffBIR's variant (its YAML spells it `unshuffle: true, unshuffle_scale`,
    and the upscale `sf`; `from_dict` reads both spellings).
    """

    img_size: int = 64
    patch_size: int = 1
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    upscale: int = 1
    img_range: float = 1.0
    upsampler: str = ""
    resi_connection: str = "1conv"
    unshuffle_scale: int = 1

    def __post_init__(self):
        problems = []
        if self.upsampler not in UPSAMPLERS:
            problems.append(f"upsampler={self.upsampler!r} (one of {UPSAMPLERS})")
        if self.resi_connection not in ("1conv", "3conv"):
            problems.append(f"resi_connection={self.resi_connection!r} ('1conv' or '3conv')")
        if len(self.depths) != len(self.num_heads):
            problems.append(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if any(self.embed_dim % h for h in self.num_heads):
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.upsampler == "pixelshuffle" and not (_is_pow2(self.upscale) or self.upscale == 3):
            problems.append(f"upscale={self.upscale} with 'pixelshuffle' (powers of 2 or 3)")
        if self.upsampler == "nearest+conv" and self.upscale not in (2, 4, 8):
            problems.append(f"upscale={self.upscale} with 'nearest+conv' (2, 4 or 8)")
        if self.upsampler == "" and self.upscale != 1:
            problems.append(f"upscale={self.upscale} with no upsampler (must be 1)")
        if self.unshuffle_scale < 1 or self.upscale % self.unshuffle_scale:
            problems.append(f"unshuffle_scale={self.unshuffle_scale} must divide upscale={self.upscale}")
        if problems:
            raise ValueError("SwinIRConfig: " + "; ".join(problems))

    @property
    def patches_resolution(self) -> int:
        return self.img_size // self.patch_size

    @property
    def attention_window(self) -> int:
        """The window actually used: the official code shrinks it to the patch grid when that is smaller."""
        return min(self.window_size, self.patches_resolution)

    @property
    def shifts(self) -> bool:
        return self.patches_resolution > self.window_size

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return self.upscale // self.unshuffle_scale

    @property
    def pad_multiple(self) -> int:
        return self.attention_window * self.unshuffle_scale

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "SwinIR config") -> SwinIRConfig:
        """From our own dict or DiffBIR's YAML params (`sf`, `unshuffle`, `unshuffle_scale`)."""
        config = dict(config)
        if "sf" in config:
            config["upscale"] = config.pop("sf")
        if "unshuffle" in config:
            if not config.pop("unshuffle"):
                config["unshuffle_scale"] = 1
        if isinstance(config.get("img_size"), (list, tuple)):
            size = tuple(config["img_size"])
            if size[0] != size[1]:
                raise ValueError(f"{source}: non-square img_size {size} is not supported")
            config["img_size"] = size[0]
        return dataclass_from_dict(
            cls, config, kind="SwinIR", source=source,
            feature_off={"norm_layer": ("LayerNorm",), "use_checkpoint": (False, True)}, ignored=("target",),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self, "SwinIR")


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ----------------------------------------------------------------------------------- window helpers
def pixel_shuffle(x: Array, r: int) -> Array:
    """torch.nn.PixelShuffle in NHWC: [B, H, W, C*r*r] -> [B, H*r, W*r, C], channel order (c, i, j)."""
    return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=r, j=r)


def pixel_unshuffle(x: Array, r: int) -> Array:
    """torch.nn.PixelUnshuffle in NHWC: [B, H*r, W*r, C] -> [B, H, W, C*r*r]."""
    return einops.rearrange(x, "b (h i) (w j) c -> b h w (c i j)", i=r, j=r)


def window_partition(x: Array, ws: int) -> Array:
    """[B, H, W, C] -> [B * nW, ws*ws, C], windows in row-major order."""
    return einops.rearrange(x, "b (nh i) (nw j) c -> (b nh nw) (i j) c", i=ws, j=ws)


def window_merge(x: Array, ws: int, h: int, w: int) -> Array:
    """Inverse of `window_partition`: [B * nW, ws*ws, C] -> [B, H, W, C]."""
    return einops.rearrange(x, "(b nh nw) (i j) c -> b (nh i) (nw j) c", nh=h // ws, nw=w // ws, i=ws, j=ws)


def relative_position_index(ws: int) -> np.ndarray:
    """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table, laid out as the official buffer."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).astype(np.int64)


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """[nW, ws*ws, ws*ws] additive mask (0 or -100) that keeps a shifted window inside its regions."""
    regions = np.zeros((h, w), np.float32)
    bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(bands):
        for j, wsl in enumerate(bands):
            regions[hs, wsl] = 3 * i + j
    windows = window_partition(regions[None, :, :, None], ws)[..., 0]  # [nW, N]
    different = windows[:, None, :] != windows[:, :, None]
    return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `rate` (rng "dropout")."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


# ------------------------------------------------------------------------------------------ modules
class SwinModule(nn.Module):
    config: SwinIRConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"  # a name of models.attention's registry: the window attention runs on it

    def kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    attention_backend=self.attention_backend)


class WindowAttention(SwinModule):
    """Multi-head self-attention inside ws x ws windows, with a learned relative position bias."""

    num_heads: int = 6

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
        """x: [B*nW, N, C]; mask: [nW, N, N] or None."""
        cfg, ws = self.config, self.config.attention_window
        batch, n, c = x.shape
        head_dim = c // self.num_heads
        scale = cfg.qk_scale or head_dim**-0.5
        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(_trunc_normal, (None, "heads")),
            ((2 * ws - 1) ** 2, self.num_heads),
            self.param_dtype,
        )
        qkv = dense(self, 3 * c, "qkv", ("embed", "heads"), cfg.qkv_bias, _trunc_normal)(x)
        q, k, v = jnp.split(qkv.reshape(batch, n, 3 * self.num_heads, head_dim), 3, axis=2)
        rel = jnp.asarray(table)[relative_position_index(ws).reshape(-1)].reshape(n, n, -1)
        bias = jnp.transpose(rel, (2, 0, 1)).astype(jnp.float32)[None]  # [1, heads, N, N]
        if mask is not None:  # windows are batch-major: [B, nW] flattened
            nw = mask.shape[0]
            bias = bias[None] + jnp.asarray(mask, jnp.float32)[None, :, None]
            bias = jnp.broadcast_to(bias, (batch // nw, nw, self.num_heads, n, n)).reshape(batch, self.num_heads, n, n)
        if cfg.attn_drop_rate == 0.0 or deterministic:
            # the shared backends take the softmax scale D**-0.5: fold a custom qk_scale into q
            q = q * (scale * head_dim**0.5) if cfg.qk_scale else q
            out = attention_backend(self.attention_backend)(q, k, v, bias=bias).reshape(batch, n, c)
        else:  # dropout on the attention weights: no backend computes them, so the explicit form
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, precision=self.precision).astype(jnp.float32)
            weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
            weights = nn.Dropout(cfg.attn_drop_rate)(weights, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision).reshape(batch, n, c)
        out = dense(self, c, "proj", ("heads", "embed"), True, _trunc_normal)(out)
        return nn.Dropout(cfg.drop_rate)(out, deterministic=deterministic)


class SwinTransformerBlock(SwinModule):
    """LayerNorm, (shifted-)window attention, residual; LayerNorm, MLP, residual. x: [B, H, W, C]."""

    num_heads: int = 6
    shift: int = 0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        ws = self.config.attention_window
        b, h, w, c = x.shape
        y = layer_norm(self, LN_EPS, "norm1")(x)
        mask = None
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
            mask = jnp.asarray(shifted_window_mask(h, w, ws, self.shift))
        y = WindowAttention(self.config, **self.kw(), num_heads=self.num_heads, name="attn")(
            window_partition(y, ws), mask, deterministic
        )
        y = window_merge(y, ws, h, w)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + DropPath(self.drop_path)(y, deterministic)
        cfg = self.config
        mlp = MLP(int(cfg.embed_dim * cfg.mlp_ratio), functools.partial(nn.gelu, approximate=False),
                  dropout_rate=cfg.drop_rate, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, name="mlp")
        y = mlp(
            layer_norm(self, LN_EPS, "norm2")(x), deterministic
        )
        return x + DropPath(self.drop_path)(y, deterministic)


class ResidualConv(SwinModule):
    """The conv closing each RSTB and the body: one 3x3 conv, or DiffBIR/official '3conv' (C/4 bottleneck)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = self.config.embed_dim
        if self.config.resi_connection == "1conv":
            return conv(self, dim, 3, "0")(x)
        x = nn.leaky_relu(conv(self, dim // 4, 3, "0")(x), 0.2)
        x = nn.leaky_relu(conv(self, dim // 4, 1, "2")(x), 0.2)
        return conv(self, dim, 3, "4")(x)


class BasicLayer(SwinModule):
    """`depth` Swin layers, every second one with shifted windows. x: [B, H, W, C]."""

    index: int = 0
    remat: bool | str = False

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        depth, heads = cfg.depths[self.index], cfg.num_heads[self.index]
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths))[sum(cfg.depths[: self.index]):]
        block_cls = remat_block(SwinTransformerBlock, self.remat, static_argnums=(2,))
        for i in range(depth):
            shift = cfg.attention_window // 2 if (i % 2 and cfg.shifts) else 0
            x = block_cls(cfg, **self.kw(), num_heads=heads, shift=shift, drop_path=float(rates[i]),
                          name=f"blocks_{i}")(x, deterministic)
        return x


class RSTB(SwinModule):
    """Residual Swin Transformer Block: a `BasicLayer`, a conv, a residual."""

    index: int = 0
    remat: bool | str = False

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        y = BasicLayer(self.config, **self.kw(), index=self.index, remat=self.remat, name="residual_group")(
            x, deterministic)
        return x + ResidualConv(self.config, **self.kw(), name="conv")(y)


class SwinIR(ModelVariables, SwinModule):
    """SwinIR over NHWC images in [0, 1]: [B, H, W, in_chans] -> [B, H*scale, W*scale, in_chans].

    `deterministic=False` turns on dropout and stochastic depth (rng "dropout") for training.
    """

    remat: bool | str = False

    @nn.compact
    def __call__(self, image: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        if image.ndim != 4 or image.shape[-1] != cfg.in_chans:
            raise ValueError(f"SwinIR expects [B, H, W, {cfg.in_chans}] images, got shape {image.shape}")
        h, w = image.shape[1:3]
        m = cfg.pad_multiple
        # Reflect padding as the official check_image_size; jnp also reflects repeatedly past the edge.
        x = jnp.pad(image, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)), mode="reflect").astype(self.dtype)
        mean = jnp.asarray(RGB_MEAN if cfg.in_chans == 3 else (0.0,) * cfg.in_chans, self.dtype)
        x = (x - mean) * cfg.img_range
        if cfg.unshuffle_scale > 1:
            x = pixel_unshuffle(x, cfg.unshuffle_scale)
        first = conv(self, cfg.embed_dim, 3, "conv_first")(x)
        body = ResidualConv(cfg, **self.kw(), name="conv_after_body")
        features = first + body(self.features(first, deterministic))
        out = self.reconstruct(features)
        if not cfg.upsampler:  # denoising / JPEG heads predict a residual of the input
            out = x + out
        out = out / cfg.img_range + mean
        return out[:, : h * cfg.scale, : w * cfg.scale].astype(image.dtype)

    def features(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        if cfg.patch_norm:
            x = layer_norm(self, LN_EPS, "patch_embed_norm")(x)
        if cfg.ape:
            pos = self.param(
                "absolute_pos_embed",
                nn.with_logical_partitioning(_trunc_normal, (None, None, "embed")),
                (1, cfg.patches_resolution**2, cfg.embed_dim),
                self.param_dtype,
            )
            b, h, w, c = x.shape
            if h * w != pos.shape[1]:
                raise ValueError(f"SwinIR with ape=True needs {cfg.img_size}x{cfg.img_size} inputs, got {h}x{w}")
            x = x + jnp.asarray(pos, x.dtype).reshape(1, h, w, c)
        x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)
        for i in range(len(cfg.depths)):
            x = RSTB(cfg, **self.kw(), index=i, remat=self.remat, name=f"layers_{i}")(x, deterministic)
        return layer_norm(self, LN_EPS, "norm")(x)

    def reconstruct(self, x: Array) -> Array:
        cfg = self.config
        out_ch = cfg.in_chans
        lrelu = lambda y: nn.leaky_relu(y, 0.2)  # noqa: E731
        if cfg.upsampler == "pixelshuffle":
            x = nn.leaky_relu(conv(self, NUM_FEAT, 3, "conv_before_upsample_0")(x), 0.01)
            factors = [3] if cfg.upscale == 3 else [2] * int(math.log2(cfg.upscale))
            for i, r in enumerate(factors):
                x = pixel_shuffle(conv(self, r * r * NUM_FEAT, 3, f"upsample_{2 * i}")(x), r)
            return conv(self, out_ch, 3, "conv_last")(x)
        if cfg.upsampler == "pixelshuffledirect":
            return pixel_shuffle(conv(self, cfg.upscale**2 * out_ch, 3, "upsample_0")(x), cfg.upscale)
        if cfg.upsampler == "nearest+conv":
            x = nn.leaky_relu(conv(self, NUM_FEAT, 3, "conv_before_upsample_0")(x), 0.01)
            for i in range(int(math.log2(cfg.upscale))):
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = lrelu(conv(self, NUM_FEAT, 3, f"conv_up{i + 1}")(x))
            return conv(self, out_ch, 3, "conv_last")(lrelu(conv(self, NUM_FEAT, 3, "conv_hr")(x)))
        return conv(self, out_ch, 3, "conv_last")(x)

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        size = max(self.config.pad_multiple, self.config.img_size)
        return {"image": jnp.zeros((batch, size, size, self.config.in_chans), self.dtype)}


def swinir_regress(module: SwinIR, variables: dict, image: Array, tiles: tuple[int, int] | None = None) -> Array:
    """Stage 0's regression, the one convention training and restoring share: clip(SwinIR(image), 0, 1).

    image: [B, H, W, C] in [0, 1]; variables: {"params": ...} (or a group's variables with the member's params
    selected by the caller). tiles: (size, overlap) in pixels to run on overlapping tiles (`models.tiling`), whose
    blend of clipped-after outputs equals the whole image's where tiles agree. Returns [B, H*scale, W*scale, C].
    """
    def run(x):
        return module.apply(variables, x)

    out = run(image) if tiles is None else tiled_map(run, image, tiles[0], tiles[1], float(module.config.scale))
    return jnp.clip(out, 0.0, 1.0)


def swinir_restore(module: SwinIR, params: dict, image: Array) -> Array:
    """Restore NHWC images in [0, 1] of any size: [B, H, W, C] -> [B, H*scale, W*scale, C], clipped to [0, 1].

    Accepts one unbatched [H, W, C] image too. Jit it with `module` static (`jax.jit(partial(...))`);
    every new size compiles once.
    """
    single = image.ndim == 3
    x = image[None] if single else image
    out = swinir_regress(module, {"params": params}, x)
    return out[0] if single else out
