"""The Stable Diffusion UNet (SD2.1-base, SD2.1-768-v, SDXL base) in Flax, NHWC.

`UNetConfig` is built from a diffusers `unet/config.json` dict and refuses what it does not implement.
`UNet2DConditionModel` reads top-down: blocks, then the model. It takes extra input channels (conditions
concatenated to z_t: set `in_channels`) and ControlNet residuals, so ControlNets plug in unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.config_dict import dataclass_from_dict, dataclass_to_dict
from diffbody_jax.models.layers import (
    Array,
    Downsample2D,
    Dtype,
    Precision,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2D,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers fields that we accept only at the value that means "feature off". A config asking for the
# feature is refused by name rather than silently run without it.
_FEATURE_OFF: dict[str, tuple[Any, ...]] = {
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "act_fn": ("silu",),
    "dropout": (0.0,),
}
# Read by diffusers only for features we refuse above, so their values do not matter.
_IGNORED = ("addition_embed_type_num_heads",)


def _per_block(value: Any, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} down blocks: {value}")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet, with diffusers' field names and defaults.

    `attention_head_dim` keeps diffusers' meaning: when `num_attention_heads` is absent (always, for
    UNet2DConditionModel) it is the number of heads per block; each head has C_block / heads channels.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.down_block_types)
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        bad += [t for t in self.up_block_types if t not in UP_BLOCKS]
        if self.mid_block_type not in MID_BLOCKS:
            bad.append(self.mid_block_type)
        if bad:
            supported = DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS
            raise ValueError(f"UNet config: unsupported block types {bad}; supported {supported}")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"UNet config: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({len(self.block_out_channels)}) must have the same length"
            )
        if self.num_attention_heads is not None:
            raise ValueError(
                "UNet config: num_attention_heads must be null for UNet2DConditionModel (diffusers refuses it "
                "too); give the head count in attention_head_dim"
            )
        for name in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
                raise ValueError(f"UNet config: per-layer lists in {name} are not supported: {value}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported")
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNet config: block_out_channels {c} not divisible by norm_num_groups")
        for c, h in zip(self.block_out_channels, self.heads, strict=True):
            if c % h:
                raise ValueError(f"UNet config: {c} channels cannot be split into {h} attention heads")

    # ------------------------------------------------------------------ diffusers config.json <-> ours
    @classmethod
    def from_diffusers(cls, config: dict[str, Any], source: str = "config") -> UNetConfig:
        """Build from a diffusers config dict; fields we do not implement are refused by name."""
        config = dict(config)
        # diffusers treats a null upcast_attention as False.
        config["upcast_attention"] = bool(config.get("upcast_attention") or False)
        return dataclass_from_dict(cls, config, kind="UNet", source=source, feature_off=_FEATURE_OFF, ignored=_IGNORED)

    def to_diffusers(self) -> dict[str, Any]:
        return dataclass_to_dict(self, "UNet2DConditionModel")

    # ------------------------------------------------------------------------- derived per-block sizes
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def up_transformer_depths(self) -> tuple[int, ...]:
        if self.reverse_transformer_layers_per_block is not None:
            name = "reverse_transformer_layers_per_block"
            return _per_block(self.reverse_transformer_layers_per_block, self.num_blocks, name)
        return self.transformer_depths[::-1]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of the pooled text embedding that SDXL's text_time embedding expects (6 time ids)."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """What every ResNet and Transformer2D inside the UNet's blocks shares."""

    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_backend: str = "einsum"


class _Block(nn.Module):
    """Common fields and constructors of the down, mid and up blocks."""

    out_channels: int
    settings: BlockSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock2D:
        s = self.settings
        return ResnetBlock2D(
            self.out_channels, s.groups, s.eps, scale, self.dtype, self.param_dtype, self.precision, name=name
        )

    def transformer(self, heads: int, depth: int, name: str) -> Transformer2D:
        s = self.settings
        return Transformer2D(
            heads, self.out_channels // heads, depth, s.use_linear_projection, s.groups, s.upcast_attention,
            s.attention_backend, self.dtype, self.param_dtype, self.precision, name=name,
        )


class DownBlock(_Block):
    """`num_layers` ResNets (each followed by a Transformer2D if `heads`), then an optional stride-2 conv.

    x: [B, H, W, C_in]; temb: [B, T]; context: [B, S, C_ctx].
    Returns (x, skips): x [B, H', W', out_channels] and one skip per ResNet plus one for the downsampler.
    """

    num_layers: int = 2
    heads: int | None = None  # None: DownBlock2D, no attention
    transformer_depth: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: Array, temb: Array, context: Array | None) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads:
                x = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, self.downsample_padding, self.dtype, self.param_dtype, self.precision,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """ResNet, then `num_layers` x (Transformer2D, ResNet). x: [B, H, W, C] -> [B, H, W, C]."""

    heads: int = 8
    transformer_depth: int = 1
    num_layers: int = 1
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: Array, temb: Array, context: Array) -> Array:
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock(_Block):
    """Per skip: concatenate it on channels, ResNet (then Transformer2D if `heads`); then an optional upsample.

    x: [B, H, W, C]; skips: the matching down-path features, consumed last-first; returns
    [B, H', W', out_channels], where (H', W') = `upsample_size` if set, else 2x when upsampling.
    """

    heads: int | None = None  # None: UpBlock2D, no attention
    transformer_depth: int = 1
    upsample_size: tuple[int, int] | None = None
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: Array, skips: tuple[Array, ...], temb: Array, context: Array | None) -> Array:
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads:
                x = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(
                self.out_channels, self.upsample_size, self.dtype, self.param_dtype, self.precision,
                name="upsamplers_0",
            )(x)
        return x


class UNet2DConditionModel(nn.Module):
    """Conditional UNet of Stable Diffusion 2.x / XL. Run-time choices (dtype, attention backend, remat)
    are module fields; the architecture is `config`.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"
    remat: bool = False  # rematerialise each block's activations in the backward pass

    def _settings(self) -> BlockSettings:
        c = self.config
        return BlockSettings(
            c.norm_num_groups, c.norm_eps, c.use_linear_projection, c.upcast_attention, self.attention_backend
        )

    def _block_kwargs(self) -> dict[str, Any]:
        return dict(settings=self._settings(), dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def _time_embedding(self, timesteps: Array, batch: int, text_embeds, time_ids) -> Array:
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        sinusoid = dict(flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        t_emb = timestep_embedding(t, c.block_out_channels[0], **sinusoid)

        def mlp(name):
            return TimestepEmbedding(c.time_embed_dim, self.dtype, self.param_dtype, self.precision, name=name)

        emb = mlp("time_embedding")(t_emb.astype(self.dtype))
        if c.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet has a text_time embedding: pass text_embeds [B, D] and time_ids [B, 6]")
            time_emb = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, **sinusoid)
            time_emb = time_emb.reshape(batch, -1)
            added = jnp.concatenate([text_embeds.astype(jnp.float32), time_emb], axis=-1)
            emb = emb + mlp("add_embedding")(added.astype(self.dtype))
        return emb

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Array,
        *,
        text_embeds: Array | None = None,
        time_ids: Array | None = None,
        down_residuals: Sequence[Array] | None = None,
        mid_residual: Array | None = None,
    ) -> Array:
        """Predict the model output (eps or v, as trained) for noisy latents.

        sample: [B, H, W, in_channels] latents (plus any concatenated conditions), NHWC.
        timesteps: [B] or scalar, int or float.
        encoder_hidden_states: [B, S, cross_attention_dim] text features.
        text_embeds: [B, D] pooled text embedding, time_ids: [B, 6] (SDXL's text_time embedding only).
        down_residuals: one tensor per skip, shaped like the skips (ControlNet), added before the up path.
        mid_residual: [B, H/2^k, W/2^k, C_last], added to the mid block's output.
        Returns [B, H, W, out_channels] in the compute dtype.
        """
        c = self.config
        down_cls = nn.remat(DownBlock) if self.remat else DownBlock
        mid_cls = nn.remat(MidBlock) if self.remat else MidBlock
        up_cls = nn.remat(UpBlock) if self.remat else UpBlock
        kw = self._block_kwargs()

        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = self._time_embedding(timesteps, x.shape[0], text_embeds, time_ids)
        if c.center_input_sample:
            x = 2 * x - 1.0
        x = conv(self, c.block_out_channels[0], c.conv_in_kernel, "conv_in")(x)

        skips = [x]
        for i, kind in enumerate(c.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            x, block_skips = down_cls(
                out_channels=c.block_out_channels[i], num_layers=c.layers[i], heads=c.heads[i] if attn else None,
                transformer_depth=c.transformer_depths[i], add_downsample=i < c.num_blocks - 1,
                downsample_padding=c.downsample_padding, name=f"down_blocks_{i}", **kw,
            )(x, temb, context)
            skips.extend(block_skips)

        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: expected {len(skips)} tensors, got {len(down_residuals)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]

        x = mid_cls(
            out_channels=c.block_out_channels[-1], heads=c.heads[-1], transformer_depth=c.transformer_depths[-1],
            output_scale_factor=c.mid_block_scale_factor, name="mid_block", **kw,
        )(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        up_channels, up_heads, up_layers = c.block_out_channels[::-1], c.heads[::-1], c.layers[::-1]
        for i, kind in enumerate(c.up_block_types):
            n = up_layers[i] + 1
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            last = i == c.num_blocks - 1
            attn = kind == "CrossAttnUpBlock2D"
            x = up_cls(
                out_channels=up_channels[i], heads=up_heads[i] if attn else None,
                transformer_depth=c.up_transformer_depths[i],
                # Upsample to the next skip's size: 2x normally, and PyTorch's size-forced nearest
                # resize when the latent is not a multiple of the total down-sampling factor.
                upsample_size=None if last else tuple(skips[-1].shape[1:3]), add_upsample=not last,
                name=f"up_blocks_{i}", **kw,
            )(x, block_skips, temb, context)

        x = nn.silu(group_norm(self, c.norm_num_groups, c.norm_eps, "conv_norm_out")(x))
        return conv(self, c.out_channels, c.conv_out_kernel, "conv_out")(x)

    # --------------------------------------------------------------------------------------- init
    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Array]:
        """Smallest inputs that build every parameter: latents of `size` (default 2^(levels-1))."""
        c = self.config
        size = size or 2 ** (c.num_blocks - 1)
        inputs = dict(
            sample=jnp.zeros((batch, size, size, c.in_channels), self.dtype),
            timesteps=jnp.zeros((batch,), jnp.int32),
            encoder_hidden_states=jnp.zeros((batch, 1, c.cross_attention_dim), self.dtype),
        )
        if c.addition_embed_type == "text_time":
            inputs["text_embeds"] = jnp.zeros((batch, c.text_embeds_dim), self.dtype)
            inputs["time_ids"] = jnp.zeros((batch, 6), jnp.float32)
        return inputs

    def init_params(self, rng: jax.Array) -> dict:
        """Random params as a plain pytree (logical-axis boxes removed)."""
        inputs = self.dummy_inputs()
        return nn.unbox(self.init(rng, **inputs))["params"]

    def param_shapes(self) -> dict:
        """Param shapes (ShapeDtypeStruct pytree) without allocating memory."""
        return jax.eval_shape(self.init_params, jax.random.key(0))


def build_unet(model_config) -> UNet2DConditionModel:
    """The module described by a `configs/unet.py` `model` section (or any mapping with its fields)."""
    return UNet2DConditionModel(
        UNetConfig.from_diffusers(dict(model_config["diffusers"]), source="model.diffusers"),
        dtype=jnp.dtype(model_config["dtype"]),
        param_dtype=jnp.dtype(model_config["param_dtype"]),
        attention_backend=model_config["attention_backend"],
        remat=bool(model_config["remat"]),
    )
