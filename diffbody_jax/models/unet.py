"""The Stable Diffusion UNet (SD2.1-base, SD2.1-768-v, SDXL base) in Flax, NHWC.

`UNetConfig` is built from a diffusers `unet/config.json` dict and refuses what it does not implement.
`UNet2DConditionModel` reads top-down: blocks, then the model. It takes extra input channels (conditions
concatenated to z_t: set `in_channels`) and ControlNet residuals, so ControlNets plug in unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from diffbody_jax.config import dataclass_from_dict, dataclass_to_dict, runtime_kwargs
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
    remat_block,
    timestep_embedding,
)
from diffbody_jax.models.variables import ModelVariables

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
        if self.addition_embed_type not in (None, "text_time", "time"):
            raise ValueError(f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported")
        if self.addition_embed_type and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                f"UNet config: addition_embed_type={self.addition_embed_type!r} needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        time_only = self.addition_embed_type == "time"
        if time_only and self.projection_class_embeddings_input_dim % self.addition_time_embed_dim:
            raise ValueError(
                "UNet config: addition_embed_type='time' needs projection_class_embeddings_input_dim = "
                f"(number of time ids) x addition_time_embed_dim, got {self.projection_class_embeddings_input_dim} "
                f"and {self.addition_time_embed_dim}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNet config: block_out_channels {c} not divisible by norm_num_groups")
        for c, h in zip(self.block_out_channels, self.heads, strict=True):
            if c % h:
                raise ValueError(f"UNet config: {c} channels cannot be split into {h} attention heads")

    # ------------------------------------------------------------------ diffusers config.json <-> ours
    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> UNetConfig:
        """Build from a diffusers config dict; fields we do not implement are refused by name."""
        config = dict(config)
        # diffusers treats a null upcast_attention as False.
        config["upcast_attention"] = bool(config.get("upcast_attention") or False)
        return dataclass_from_dict(cls, config, kind="UNet", source=source, feature_off=_FEATURE_OFF, ignored=_IGNORED)

    def to_dict(self) -> dict[str, Any]:
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
    def num_time_ids(self) -> int:
        """Size conditioning values per example: 6 for SDXL's text_time, any count for "time", else 0."""
        if self.addition_embed_type == "text_time":
            return 6
        if self.addition_embed_type == "time":
            return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim
        return 0

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of the pooled text embedding that SDXL's text_time embedding expects (6 time ids)."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @property
    def num_skips(self) -> int:
        """Skip connections (and so ControlNet down residuals): conv_in, every ResNet, every downsampler."""
        return 1 + sum(self.layers) + self.num_blocks - 1

    @property
    def skips_per_up_block(self) -> tuple[int, ...]:
        return tuple(n + 1 for n in self.layers[::-1])


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """What every ResNet and Transformer2D inside the UNet's blocks shares."""

    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_backend: str = "einsum"
    ip_adapter: bool = False  # IP-Adapter key/value pairs in every cross-attention
    scan_layers: bool = False  # each Transformer2D of depth > 1 scans its blocks (models/stacked_blocks.py)


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
            s.attention_backend, s.ip_adapter, s.scan_layers, self.dtype, self.param_dtype, self.precision,
            name=name,
        )


class DownBlock(_Block):
    """`num_layers` ResNets (each followed by a Transformer2D if `heads`), then an optional stride-2 conv.

    x: [B, H, W, C_in]; temb: [B, T]; context: [B, S, C_ctx]; ip_context: [B, N, C_ctx] image tokens or None.
    Returns (x, skips): x [B, H', W', out_channels] and one skip per ResNet plus one for the downsampler.
    """

    num_layers: int = 2
    heads: int | None = None  # None: DownBlock2D, no attention
    transformer_depth: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(
        self, x: Array, temb: Array, context: Array | None, ip_context: Array | None = None, ip_scale=1.0
    ) -> tuple[Array, tuple[Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads:
                attn = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")
                x = attn(x, context, ip_context, ip_scale)
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
    def __call__(self, x: Array, temb: Array, context: Array, ip_context: Array | None = None, ip_scale=1.0) -> Array:
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            attn = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")
            x = attn(x, context, ip_context, ip_scale)
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
    def __call__(
        self, x: Array, skips: tuple[Array, ...], temb: Array, context: Array | None,
        ip_context: Array | None = None, ip_scale=1.0,
    ) -> Array:
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.heads:
                attn = self.transformer(self.heads, self.transformer_depth, f"attentions_{i}")
                x = attn(x, context, ip_context, ip_scale)
        if self.add_upsample:
            x = Upsample2D(
                self.out_channels, self.upsample_size, self.dtype, self.param_dtype, self.precision,
                name="upsamplers_0",
            )(x)
        return x


class UNetModule(ModelVariables, nn.Module):
    """Fields shared by the UNet, the ControlNet and the joint UNet: the architecture `config` first, then
    the run-time choices (compute dtype, param dtype, matmul precision, attention backend, remat).
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"
    remat: bool | str = False  # False | True | a policy of layers.REMAT_POLICIES (rematerialise each block)
    scan_layers: bool = False  # scan the blocks of deep transformer stacks: params in the scanned layout

# -------------------------------------------------------------------------------- trunk builders
# The UNet, the ControlNet and the joint UNet assemble the same blocks from a `UNetConfig`. These
# builders are called inside a module's compact `__call__` (`m`), so the blocks become its children.


def _kw(m: UNetModule, config: UNetConfig) -> dict[str, Any]:
    settings = BlockSettings(
        config.norm_num_groups, config.norm_eps, config.use_linear_projection, config.upcast_attention,
        m.attention_backend, getattr(m, "ip_adapter", False), m.scan_layers,
    )
    return dict(settings=settings, dtype=m.dtype, param_dtype=m.param_dtype, precision=m.precision)


def time_embedding(
    m: UNetModule, config: UNetConfig, timesteps: Array, batch: int, text_embeds=None, time_ids=None
) -> Array:
    """The embedding every ResNet receives: [B, 4 C_0] from timesteps, plus the added size conditioning.

    timesteps: [B] or scalar. text_embeds: [B, D] (text_time only). time_ids: [B, config.num_time_ids].
    """
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    sinusoid = dict(flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift)
    t_emb = timestep_embedding(t, config.block_out_channels[0], **sinusoid)

    def mlp(name):
        return TimestepEmbedding(config.time_embed_dim, m.dtype, m.param_dtype, m.precision, name=name)

    emb = mlp("time_embedding")(t_emb.astype(m.dtype))
    if config.addition_embed_type:
        needs_text = config.addition_embed_type == "text_time"
        if time_ids is None or (needs_text and text_embeds is None):
            inputs = "text_embeds [B, D] and time_ids [B, 6]" if needs_text else f"time_ids [B, {config.num_time_ids}]"
            raise ValueError(f"this model has a {config.addition_embed_type} embedding: pass {inputs}")
        if time_ids.shape[-1] != config.num_time_ids:
            raise ValueError(f"time_ids: expected {config.num_time_ids} values per example, got shape {time_ids.shape}")
        added = timestep_embedding(time_ids.reshape(-1), config.addition_time_embed_dim, **sinusoid).reshape(batch, -1)
        if needs_text:
            added = jnp.concatenate([text_embeds.astype(jnp.float32), added], axis=-1)
        emb = emb + mlp("add_embedding")(added.astype(m.dtype))
    return emb


def down_block(m: UNetModule, config: UNetConfig, i: int, name: str) -> DownBlock:
    attn = config.down_block_types[i] == "CrossAttnDownBlock2D"
    cls = remat_block(DownBlock, m.remat)
    return cls(
        out_channels=config.block_out_channels[i], num_layers=config.layers[i],
        heads=config.heads[i] if attn else None, transformer_depth=config.transformer_depths[i],
        add_downsample=i < config.num_blocks - 1, downsample_padding=config.downsample_padding, name=name,
        **_kw(m, config),
    )


def mid_block(m: UNetModule, config: UNetConfig, name: str = "mid_block") -> MidBlock:
    cls = remat_block(MidBlock, m.remat)
    return cls(
        out_channels=config.block_out_channels[-1], heads=config.heads[-1],
        transformer_depth=config.transformer_depths[-1], output_scale_factor=config.mid_block_scale_factor,
        name=name, **_kw(m, config),
    )


def up_block(m: UNetModule, config: UNetConfig, i: int, upsample_size: tuple[int, int] | None, name: str) -> UpBlock:
    """Up block i (0 = deepest). `upsample_size`: the next skip's (H, W), which is 2x except when the latent
    is not a multiple of the total down-sampling factor (then PyTorch's size-forced nearest resize).
    """
    attn = config.up_block_types[i] == "CrossAttnUpBlock2D"
    last = i == config.num_blocks - 1
    cls = remat_block(UpBlock, m.remat)
    return cls(
        out_channels=config.block_out_channels[::-1][i], heads=config.heads[::-1][i] if attn else None,
        transformer_depth=config.up_transformer_depths[i], upsample_size=None if last else upsample_size,
        add_upsample=not last, name=name, **_kw(m, config),
    )


def output_head(m: UNetModule, config: UNetConfig, x: Array, suffix: str = "") -> Array:
    """GroupNorm, SiLU, conv to `out_channels`: [B, H, W, C_0] -> [B, H, W, out_channels]."""
    x = nn.silu(group_norm(m, config.norm_num_groups, config.norm_eps, f"conv_norm_out{suffix}")(x))
    return conv(m, config.out_channels, config.conv_out_kernel, f"conv_out{suffix}")(x)


def add_residuals(skips: Sequence[Array], residuals: Sequence[Array] | None) -> list[Array]:
    """ControlNet down residuals added to the skips they were computed for, one per skip."""
    if residuals is None:
        return list(skips)
    if len(residuals) != len(skips):
        raise ValueError(f"down_residuals: expected {len(skips)} tensors (one per skip), got {len(residuals)}")
    return [s + r.astype(s.dtype) for s, r in zip(skips, residuals, strict=True)]


def dummy_unet_inputs(m: UNetModule, config: UNetConfig, in_channels: int, batch: int, size: int | None):
    """Smallest inputs that build every parameter: latents of `size` (default 2^(levels-1))."""
    size = size or 2 ** (config.num_blocks - 1)
    inputs = dict(
        sample=jnp.zeros((batch, size, size, in_channels), m.dtype),
        timesteps=jnp.zeros((batch,), jnp.int32),
        encoder_hidden_states=jnp.zeros((batch, 1, config.cross_attention_dim), m.dtype),
    )
    if config.addition_embed_type:
        inputs["time_ids"] = jnp.zeros((batch, config.num_time_ids), jnp.float32)
    if config.addition_embed_type == "text_time":
        inputs["text_embeds"] = jnp.zeros((batch, config.text_embeds_dim), m.dtype)
    return inputs


class SDXLText(NamedTuple):
    """SDXL's text conditioning, as `conditioning.prompts.sdxl_conditioning` returns it and the SDXL models take
    it. prompt_embeds: [B, S, 2048] (both encoders' penultimate hidden states, concatenated on channels);
    text_embeds: [B, 1280] (encoder 2's projected pooled output); time_ids: [B, 6] (original size, crop top-left,
    target size)."""

    prompt_embeds: Array
    text_embeds: Array
    time_ids: Array


class UNet2DConditionModel(UNetModule):
    """Conditional UNet of Stable Diffusion 2.x / XL. Run-time choices (dtype, attention backend, remat)
    are module fields; the architecture is `config` (a `UNetConfig`).

    `ip_adapter=True` adds IP-Adapter's image key/value projections (`to_k_ip`, `to_v_ip`) to every
    cross-attention: the colour adapter's half that lives inside the UNet (the Resampler is separate,
    `diffbody_jax.models.ip_adapter`). Without image tokens, such a UNet computes exactly the plain one.
    """

    ip_adapter: bool = False

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
        image_tokens: Array | None = None,
        ip_scale: float | Array = 1.0,
    ) -> Array:
        """Predict the model output (eps or v, as trained) for noisy latents.

        sample: [B, H, W, in_channels] latents (plus any concatenated conditions), NHWC.
        timesteps: [B] or scalar, int or float.
        encoder_hidden_states: [B, S, cross_attention_dim] text features.
        text_embeds: [B, D] pooled text embedding (text_time only); time_ids: [B, config.num_time_ids].
        down_residuals: one tensor per skip, shaped like the skips (ControlNet), added before the up path.
        mid_residual: [B, H/2^k, W/2^k, C_last], added to the mid block's output.
        image_tokens: [B, N, cross_attention_dim] IP-Adapter image tokens (the Resampler's output); needs
          `ip_adapter=True`. ip_scale: a scalar or [B] weight of their attention; a Python 0 skips it.
        Returns [B, H, W, out_channels] in the compute dtype.
        """
        c = self.config
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if image_tokens is not None and not self.ip_adapter:
            raise ValueError("image_tokens given to a UNet built without ip_adapter=True")
        if isinstance(ip_scale, (int, float)) and ip_scale == 0:
            image_tokens = None  # adapter off: the plain UNet's program
        ip = None if image_tokens is None else image_tokens.astype(self.dtype)
        if ip is not None and ip.shape[-1] != c.cross_attention_dim:
            raise ValueError(f"image_tokens: expected [B, N, {c.cross_attention_dim}], got {tuple(ip.shape)}")
        temb = time_embedding(self, c, timesteps, x.shape[0], text_embeds, time_ids)
        if c.center_input_sample:
            x = 2 * x - 1.0
        x = conv(self, c.block_out_channels[0], c.conv_in_kernel, "conv_in")(x)

        skips = [x]
        for i in range(c.num_blocks):
            x, block_skips = down_block(self, c, i, f"down_blocks_{i}")(x, temb, context, ip, ip_scale)
            skips.extend(block_skips)
        skips = add_residuals(skips, down_residuals)

        x = mid_block(self, c)(x, temb, context, ip, ip_scale)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        for i, n in enumerate(c.skips_per_up_block):
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = up_block(self, c, i, size, f"up_blocks_{i}")(x, block_skips, temb, context, ip, ip_scale)
        return output_head(self, c, x)

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Array]:
        return dummy_unet_inputs(self, self.config, self.config.in_channels, batch, size)


def build_unet(model_config) -> UNet2DConditionModel:
    """The module described by a `configs/unet.py` `model` section (or any mapping with its fields)."""
    return UNet2DConditionModel(
        UNetConfig.from_dict(dict(model_config["diffusers"]), source="model.diffusers"),
        **runtime_kwargs(model_config, scan_layers=True),
    )

