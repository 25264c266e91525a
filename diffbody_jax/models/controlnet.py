"""ControlNet (SD2.1 and SDXL layouts) in Flax, NHWC, built from the UNet's own blocks.

A ControlNet is a trainable copy of the UNet's encoder (conv_in, time embedding, down blocks, mid block)
that also sees a condition. Each skip tensor and the mid output pass through a zero-initialised 1x1 conv
and come out as residuals for the frozen UNet (`UNet2DConditionModel(..., down_residuals=, mid_residual=)`).

The condition enters through one of two embeddings, chosen by `conditioning_embedding_type`:

  "pixel"   diffusers' ControlNetConditioningEmbedding: an image [B, 8H, 8W, conditioning_channels]
            through 3x3 convs (channels `conditioning_embedding_out_channels`, a stride-2 conv between
            levels, SiLU after each) and a zero-initialised 3x3 conv to C_0 at latent resolution.
  "latent"  DiffBody's condition at latent resolution [B, H, W, conditioning_channels], e.g. v1's
            [E(I_reg), E(I_pose), I_attn] (4 + 4 + 1) or v2 stage 1's E(I_ir) (4): only the zero-initialised
            3x3 conv to C_0 (PyTorch key `controlnet_cond_embedding.conv_out`).
  "prior_fusion"  DiffBody v2 stage 2: several image-resolution priors, each through its own pixel embedding,
            fused as sum_i alpha_i F_i(prior_i) (`diffbody_jax.models.prior_fusion`); the condition is a dict
            {prior name: [B, 8H, 8W, C_i]}. PyTorch keys `controlnet_cond_embedding.<prior>.conv_in...` and
            `controlnet_cond_embedding.alpha` / `alpha_logits`.
The "latent" and "prior_fusion" kinds and their fields are ours; diffusers' ControlNetModel cannot load such
a folder.

The embedded condition is added to conv_in(sample) before the first down block, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffbody_jax.config import dataclass_from_dict, dataclass_to_dict, runtime_kwargs
from diffbody_jax.models.conditioning_embedding import ConditioningEmbedding
from diffbody_jax.models.joint_unet import branch_unet_params
from diffbody_jax.models.layers import Array, conv
from diffbody_jax.models.param_copy import copy_from_unet, widen_conv_in
from diffbody_jax.models.prior_fusion import DEFAULT_PRIORS, PriorFusion, PriorFusionConfig, prior_alphas
from diffbody_jax.models.unet import (
    _FEATURE_OFF,
    UNetConfig,
    UNetModule,
    down_block,
    dummy_unet_inputs,
    mid_block,
    time_embedding,
)

CONDITIONING_EMBEDDINGS = ("pixel", "latent", "prior_fusion")
# our fields, written to config.json only for the conditioning kinds that use them
_FUSION_FIELDS = ("prior_names", "prior_channels", "fusion_alpha_mode", "fusion_alphas", "missing_prior")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_CONTROLNET_OFF = {k: v for k, v in _FEATURE_OFF.items() if k in {
    "only_cross_attention", "class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
    "resnet_time_scale_shift", "act_fn",
}}
_IGNORED = ("addition_embed_type_num_heads",)
log = logging.getLogger(__name__)


# diffusers' ControlNetModel fields that describe the UNet it copies; the others are the ControlNet's own.
UNET_FIELDS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
    "upcast_attention", "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet whose encoder it copies (`unet`; its up blocks mirror the down blocks and are never
    built) and the ControlNet's own fields, with diffusers' ControlNetModel names and defaults, plus
    `conditioning_embedding_type` (ours: "pixel" as diffusers, or "latent"; see the module docstring).

    diffusers' ControlNet takes its heads from `num_attention_heads` or, when that is null, from
    `attention_head_dim`: `from_dict` resolves the two into `unet.attention_head_dim` (the UNet's meaning), and
    `to_dict` writes them back as (heads, null), which diffusers reads as the same model.
    """

    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    conditioning_embedding_type: str = "pixel"
    # "prior_fusion" only (see diffbody_jax.models.prior_fusion); None: 3 channels each, equal alphas
    prior_names: tuple[str, ...] = DEFAULT_PRIORS
    prior_channels: tuple[int, ...] | None = None
    fusion_alpha_mode: str = "softmax"
    fusion_alphas: tuple[float, ...] | None = None
    missing_prior: str = "drop"

    def __post_init__(self):
        if self.conditioning_embedding_type not in CONDITIONING_EMBEDDINGS:
            raise ValueError(
                f"ControlNet config: conditioning_embedding_type={self.conditioning_embedding_type!r}; "
                f"expected one of {CONDITIONING_EMBEDDINGS}"
            )
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                "ControlNet config: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                f"{self.controlnet_conditioning_channel_order!r}"
            )
        if self.conditioning_embedding_type != "latent" and not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNet config: pixel conditioning needs conditioning_embedding_out_channels")
        if self.conditioning_embedding_type == "prior_fusion":
            self.prior_fusion  # noqa: B018 - validates the fusion fields
        if self.unet.center_input_sample or self.unet.conv_in_kernel != 3:
            raise ValueError("ControlNet config: a ControlNet has no center_input_sample and a 3x3 conv_in")

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> ControlNetConfig:
        """Build from a diffusers ControlNetModel config dict; unsupported fields are refused by name."""
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IGNORED}
        heads = config.pop("num_attention_heads", None)
        shared = {k: config.pop(k) for k in UNET_FIELDS if k in config}
        if heads is not None:
            shared["attention_head_dim"] = heads
        own = dataclass_from_dict(cls, config, kind="ControlNet", source=source, feature_off=_CONTROLNET_OFF)
        down = tuple(shared.get("down_block_types", UNetConfig.down_block_types))
        unet = UNetConfig.from_dict({**shared, "up_block_types": [_UP_OF_DOWN.get(t, t) for t in down[::-1]]},
                                    source)
        return dataclasses.replace(own, unet=unet)

    def to_dict(self) -> dict[str, Any]:
        unet = self.unet.to_dict()
        d = {"_class_name": "ControlNetModel", **{k: unet[k] for k in UNET_FIELDS}, "num_attention_heads": None}
        own = dataclass_to_dict(self, "ControlNetModel")
        del own["unet"], own["_class_name"]
        d.update(own)
        if self.conditioning_embedding_type != "prior_fusion":
            for name in _FUSION_FIELDS:
                del d[name]
        if self.conditioning_embedding_type == "pixel":
            del d["conditioning_embedding_type"]  # keeps the folder identical to diffusers' own
        return d

    @property
    def prior_fusion(self) -> PriorFusionConfig:
        """The fused condition's config ("prior_fusion" conditioning)."""
        n = len(self.prior_names)
        return PriorFusionConfig(
            priors=tuple(self.prior_names), channels=tuple(self.prior_channels or (self.conditioning_channels,) * n),
            embedding_channels=tuple(self.conditioning_embedding_out_channels), alpha_mode=self.fusion_alpha_mode,
            alphas=tuple(self.fusion_alphas or (1.0 / n,) * n), missing_prior=self.missing_prior,
        )

    @property
    def condition_downscale(self) -> int:
        """Condition resolution / latent resolution: 2^(levels-1) for pixel embeddings, 1 for latent ones."""
        if self.conditioning_embedding_type == "latent":
            return 1
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **overrides) -> ControlNetConfig:
        """The ControlNet of a UNet (as diffusers' `ControlNetModel.from_unet`), with field overrides of either
        part, such as conditioning_channels=9, conditioning_embedding_type="latent" or in_channels=8.
        """
        unet = dataclasses.replace(unet, **{k: overrides.pop(k) for k in UNET_FIELDS if k in overrides})
        return cls(unet=unet, **overrides)


class ControlNetOutput(NamedTuple):
    """Residuals for `UNet2DConditionModel`: `down` one per skip (NHWC), `mid` for the mid block output."""

    down: tuple[Array, ...]
    mid: Array


class ControlNetModel(UNetModule):
    """ControlNet over a `ControlNetConfig`; run-time fields as the UNet's (dtype, attention backend, remat)."""

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Array,
        controlnet_cond: Array | Mapping[str, Array | None],
        *,
        prior_mask: Array | None = None,
        conditioning_scale: float | Array = 1.0,
        guess_mode: bool = False,
        text_embeds: Array | None = None,
        time_ids: Array | None = None,
    ) -> ControlNetOutput:
        """Residuals for the UNet.

        sample: [B, H, W, in_channels] noisy latents (the UNet's own input).
        timesteps: [B] or scalar. encoder_hidden_states: [B, S, cross_attention_dim].
        controlnet_cond: [B, H * s, W * s, conditioning_channels], s = `config.condition_downscale`
          (8 for SD's pixel embedding, 1 for a latent condition); for "prior_fusion" a dict
          {prior name: [B, H * s, W * s, C_i] or None} (missing priors follow `config.missing_prior`).
        prior_mask: "prior_fusion" only: [B, P] with 0 where an example lacks a prior (order of prior_names).
        conditioning_scale: a scalar or [B] array multiplying every residual (0 turns the ControlNet off).
        guess_mode: scale the residuals from 0.1 (first skip) to 1.0 (mid) on a log scale, as diffusers.
        text_embeds, time_ids: SDXL's text_time inputs, as for the UNet.
        """
        c, u = self.config, self.config.unet
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = time_embedding(self, u, timesteps, x.shape[0], text_embeds, time_ids)
        size = (x.shape[1] * c.condition_downscale, x.shape[2] * c.condition_downscale)
        if c.conditioning_embedding_type == "prior_fusion":
            embed = PriorFusion(c.prior_fusion, u.block_out_channels[0], self.dtype, self.param_dtype, self.precision,
                                name="controlnet_cond_embedding")
            cond_features = embed(self._check_priors(controlnet_cond, size), prior_mask)
        else:
            cond = self._check_condition(controlnet_cond, size, x.shape)
            cond_features = ConditioningEmbedding(
                u.block_out_channels[0], tuple(c.conditioning_embedding_out_channels), c.conditioning_embedding_type,
                self.dtype, self.param_dtype, self.precision, name="controlnet_cond_embedding",
            )(cond)

        x = conv(self, u.block_out_channels[0], 3, "conv_in")(x)
        x = x + cond_features

        skips = [x]
        for i in range(u.num_blocks):
            x, block_skips = down_block(self, u, i, f"down_blocks_{i}")(x, temb, context)
            skips.extend(block_skips)
        x = mid_block(self, u)(x, temb, context)

        down = [
            conv(self, s.shape[-1], 1, f"controlnet_down_blocks_{k}", zero_init=True)(s) for k, s in enumerate(skips)
        ]
        mid = conv(self, x.shape[-1], 1, "controlnet_mid_block", zero_init=True)(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = scale.reshape(-1, 1, 1, 1) if scale.ndim == 1 else scale
        if guess_mode and not c.global_pool_conditions:
            scales = np.logspace(-1, 0, len(down) + 1, dtype=np.float32)  # torch.logspace(-1, 0, n + 1)
        else:
            scales = np.ones(len(down) + 1, np.float32)
        down = [(d * (s * scale)).astype(self.dtype) for d, s in zip(down, scales[:-1], strict=True)]
        mid = (mid * (scales[-1] * scale)).astype(self.dtype)
        if c.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return ControlNetOutput(tuple(down), mid)

    def _check_condition(self, cond: Array, size: tuple[int, int], latent_shape) -> Array:
        c = self.config
        if isinstance(cond, Mapping):
            raise ValueError(f"controlnet_cond: a dict of priors needs conditioning_embedding_type='prior_fusion', "
                             f"this ControlNet's is {c.conditioning_embedding_type!r}")
        cond = cond.astype(self.dtype)
        if c.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        if tuple(cond.shape[1:]) != (*size, c.conditioning_channels):
            raise ValueError(
                f"controlnet_cond: expected [B, {size[0]}, {size[1]}, {c.conditioning_channels}] for latents "
                f"{tuple(latent_shape)} ({c.conditioning_embedding_type} conditioning), got {tuple(cond.shape)}"
            )
        return cond

    def _check_priors(self, priors, size: tuple[int, int]) -> dict[str, Array | None]:
        c = self.config
        if not isinstance(priors, Mapping):
            raise ValueError(f"controlnet_cond: a prior-fusion ControlNet takes a dict {{prior: [B, H, W, C]}} with "
                             f"priors {c.prior_names}, got {type(priors).__name__}")
        out = {}
        for name, x in priors.items():
            if x is not None:
                if tuple(x.shape[1:3]) != size:
                    raise ValueError(f"prior {name!r}: expected {size[0]}x{size[1]} (latent size x "
                                     f"{c.condition_downscale}), got shape {tuple(x.shape)}")
                x = x[..., ::-1] if c.controlnet_conditioning_channel_order == "bgr" else x
            out[name] = x
        return out

    def fusion_alphas(self, params: Mapping[str, Any]) -> dict[str, float]:
        """The current alpha_i of a prior-fusion ControlNet's params, {prior: value}, for logging."""
        if self.config.conditioning_embedding_type != "prior_fusion":
            raise ValueError("fusion_alphas: this ControlNet has no prior fusion")
        return prior_alphas(self.config.prior_fusion, params.get("controlnet_cond_embedding"))

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Array]:
        c = self.config
        inputs = dummy_unet_inputs(self, c.unet, c.unet.in_channels, batch, size)
        h, w = inputs["sample"].shape[1:3]
        s = c.condition_downscale
        if c.conditioning_embedding_type == "prior_fusion":
            f = c.prior_fusion
            inputs["controlnet_cond"] = {n: jnp.zeros((batch, h * s, w * s, ch), self.dtype)
                                         for n, ch in zip(f.priors, f.channels, strict=True)}
        else:
            inputs["controlnet_cond"] = jnp.zeros((batch, h * s, w * s, c.conditioning_channels), self.dtype)
        return inputs


def sum_residuals(outputs: Sequence[ControlNetOutput]) -> ControlNetOutput:
    """Several ControlNets steering one UNet: their residuals add (diffusers' MultiControlNetModel)."""
    down = tuple(sum(parts) for parts in zip(*(o.down for o in outputs), strict=True))
    return ControlNetOutput(down, sum(o.mid for o in outputs))


# ---------------------------------------------------------------------------- init from a UNet
def controlnet_from_unet(
    unet_params: dict, controlnet: ControlNetModel, rng: jax.Array
) -> tuple[dict, list[str]]:
    """ControlNet params initialised from a UNet's params, as diffusers' `ControlNetModel.from_unet`.

    conv_in (widened with zero input channels when the ControlNet takes more), time_embedding,
    add_embedding, every down block and the mid block are copied; the conditioning embedding is random
    with a zero last conv, and every residual output conv is zero, so the UNet's output is unchanged.
    Returns (params, the copied Flax param paths); a summary is logged.
    """
    roots = ("conv_in/", "time_embedding/", "add_embedding/", "down_blocks_", "mid_block/")
    return copy_from_unet(
        controlnet.init_params(rng), unet_params, lambda path: path if path.startswith(roots) else None, "ControlNet"
    )


def controlnet_from_joint_unet(
    joint_params: dict, joint_config, controlnet: ControlNetModel, rng: jax.Array, branch: str = "rgb"
) -> tuple[dict, list[str]]:
    """The stage-1 ControlNet (seed 002, Sec. 3.2) from a trained joint UNet: `controlnet_from_unet` on the view
    of one branch (default RGB) as a plain UNet, `joint_unet.branch_unet_params`: the branch's conv_in (noisy
    latent + pose latent: the ControlNet's 8 input channels, copied whole) and first down blocks, the shared
    down blocks, mid block and time embedding."""
    return controlnet_from_unet(branch_unet_params(joint_params, joint_config, branch), controlnet, rng)


def build_controlnet(model_config) -> ControlNetModel:
    """The module described by a `configs/controlnet.py` `model` section."""

    cfg = ControlNetConfig.from_dict(dict(model_config["diffusers"]), source="model.diffusers")
    return ControlNetModel(cfg, **runtime_kwargs(model_config, scan_layers=True))


def _adapt_prior_conv_in(kernel: np.ndarray, channels: int, prior: str) -> np.ndarray:
    """The source embedding's conv_in for a prior with `channels` inputs: extra channels start at zero; a
    1-channel prior gets the kernel summed over its inputs (the same response as its map repeated 3 times)."""
    if channels == 1 and kernel.shape[2] > 1:
        return kernel.sum(axis=2, keepdims=True)
    return widen_conv_in(kernel, channels, f"prior {prior!r} conv_in")


def prior_fusion_from_controlnet(
    controlnet_params: dict, fusion: ControlNetModel, rng: jax.Array
) -> tuple[dict, list[str]]:
    """A prior-fusion ControlNet initialised from a trained pixel-conditioned one (e.g. a diffusers SDXL
    ControlNet folder): the trunk and output convs are copied, and every F_i starts as a copy of the source's
    conditioning embedding (its conv_in widened with zero input channels where a prior has more channels, summed
    over its inputs for a 1-channel prior).
    The alphas start at their configured values. Returns (params, copied paths) and logs what was copied.
    """
    c = fusion.config
    if c.conditioning_embedding_type != "prior_fusion":
        raise ValueError("prior_fusion_from_controlnet: the target ControlNet must have prior_fusion conditioning")
    emb = "controlnet_cond_embedding/"
    if not any(k.startswith(emb + "conv_in/") for k in traverse_util.flatten_dict(controlnet_params, sep="/")):
        raise ValueError("prior_fusion_from_controlnet: the source params have no pixel conditioning embedding "
                         f"({emb}conv_in); got {sorted(controlnet_params)}")

    def source_path(path: str) -> str | None:
        if not path.startswith(emb):
            return path
        _, _, rest = path[len(emb):].partition("/")  # <prior>/<rest>; the alpha params have no rest
        return emb + rest if rest else None

    def adapt(path: str, src: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if path.startswith(emb) and path.endswith("/conv_in/kernel"):
            return _adapt_prior_conv_in(src, shape[2], path.split("/")[1])
        return src

    params, copied = copy_from_unet(fusion.init_params(rng), controlnet_params, source_path, "prior-fusion ControlNet",
                                    adapt, source_name="a ControlNet")
    log.info("prior-fusion ControlNet initialised from a ControlNet: trunk copied; F_i of %s each start as a copy "
             "of its conditioning embedding; alphas %s (%s)", ", ".join(c.prior_names),
             prior_alphas(c.prior_fusion, params.get(emb[:-1])), c.fusion_alpha_mode)
    return params, copied
