"""DiffBody v2 stage 2 (seed 002, Sec. 3.3): a frozen SDXL UNet steered by the prior-fusion ControlNet and
the colour adapter: the forward pass. Its losses (Eq. 3, Eq. 4) and trainable subsets are in
`diffbody_jax.training.losses` and `diffbody_jax.training.phases`.

    model = Stage2Model(unet=UNet2DConditionModel(sdxl, ip_adapter=True),
                        controlnet=ControlNetModel(stage2_controlnet), image_proj=Resampler(ResamplerConfig()))
    eps = model.apply({"params": params}, z_t, t, text, priors, image_features)

params = {"unet": ..., "controlnet": ..., "image_proj": ...} (`stage2_params` assembles them). The two
training phases train these subsets (`training.phases.STAGE2_SUBSETS`):

  "controlnet"      Eq. 3: the ControlNet with its fusion (every F_i and the alphas); UNet and adapter frozen,
                    the adapter off (ip_scale 0: exactly the plain UNet).
  "colour_adapter"  Eq. 4: only the Resampler and every to_k_ip / to_v_ip; UNet and ControlNet frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffbody_jax.config import runtime_kwargs
from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel
from diffbody_jax.models.ip_adapter import (
    Resampler,
    ResamplerConfig,
    ip_adapter_of,
    is_ip_kernel_path,
    with_ip_adapter,
)
from diffbody_jax.models.layers import Array
from diffbody_jax.models.unet import SDXLText, UNet2DConditionModel, UNetConfig
from diffbody_jax.models.variables import ModelVariables


class Stage2Model(ModelVariables, nn.Module):
    """z_t [B, H, W, 4], t [B], text (SDXLText), priors {name: [B, 8H, 8W, C_i]}, image_features [B, T, D_clip]
    (CLIP ViT-H/14 penultimate hidden states of I_res, or None: adapter off) -> eps [B, H, W, 4].
    """

    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    image_proj: Resampler

    def __post_init__(self):
        if not self.unet.ip_adapter:
            raise ValueError("Stage2Model: build the UNet with ip_adapter=True (the colour adapter's key/values)")
        if self.controlnet.config.conditioning_embedding_type != "prior_fusion":
            raise ValueError("Stage2Model: the ControlNet needs conditioning_embedding_type='prior_fusion'")
        if self.image_proj.config.output_dims != self.unet.config.cross_attention_dim:
            raise ValueError(f"Stage2Model: the Resampler outputs {self.image_proj.config.output_dims} channels, the "
                             f"UNet's cross-attention takes {self.unet.config.cross_attention_dim}")
        super().__post_init__()

    def __call__(
        self,
        z_t: Array,
        timesteps: Array,
        text: SDXLText,
        priors: Mapping[str, Array | None],
        image_features: Array | None = None,
        *,
        prior_mask: Array | None = None,
        conditioning_scale: float | Array = 1.0,
        ip_scale: float | Array = 1.0,
    ) -> Array:
        if image_features is None and self.is_initializing():
            image_features = jnp.zeros((z_t.shape[0], 1, self.image_proj.config.embed_dims), z_t.dtype)
        residuals = self.controlnet(
            z_t, timesteps, text.prompt_embeds, priors, prior_mask=prior_mask, conditioning_scale=conditioning_scale,
            text_embeds=text.text_embeds, time_ids=text.time_ids,
        )
        tokens = None if image_features is None else self.image_proj(image_features)
        return self.unet(
            z_t, timesteps, text.prompt_embeds, text_embeds=text.text_embeds, time_ids=text.time_ids,
            down_residuals=residuals.down, mid_residual=residuals.mid, image_tokens=tokens, ip_scale=ip_scale,
        )

    def dummy_inputs(self, batch: int = 1) -> dict[str, Any]:
        unet = self.unet.dummy_inputs(batch)
        cn = self.controlnet.dummy_inputs(batch)
        text = SDXLText(unet["encoder_hidden_states"], unet["text_embeds"], unet["time_ids"])
        return dict(z_t=unet["sample"], timesteps=unet["timesteps"], text=text, priors=cn["controlnet_cond"],
                    image_features=self.image_proj.dummy_inputs(batch)["image_features"])



def stage2_params(unet_params: Mapping, controlnet_params: Mapping, adapter: Mapping) -> dict:
    """The model's param tree from a plain SDXL UNet's params, the prior-fusion ControlNet's and the colour
    adapter's ({"image_proj", "ip_adapter"}, as `diffbody_jax.interop.ip_adapter` imports IP-Adapter-Plus-XL)."""
    return {"unet": with_ip_adapter(unet_params, adapter), "controlnet": dict(controlnet_params),
            "image_proj": dict(adapter["image_proj"])}


# The colour adapter <-> Stage2Model mapping, both ways: the adapter's {"image_proj", "ip_adapter"} is the model's
# image_proj subtree and the UNet's to_k_ip / to_v_ip kernels (the engine's init from an adapter file, the
# colour_adapter phase's export and the stand-in weights use these two functions).
def adapter_params(params: Mapping) -> dict:
    """The colour adapter's params {"image_proj", "ip_adapter"} of a Stage2Model's params (selected, not copied)."""
    return {"image_proj": params["image_proj"], "ip_adapter": ip_adapter_of(params["unet"])}


def adapter_paths(adapter_flat: Mapping[str, Any]) -> dict[str, Any]:
    """A colour adapter's flat params ("image_proj/...", "ip_adapter/...") keyed by the Stage2Model param paths
    they fill ("image_proj/...", "unet/..."); `is_adapter_path` is true exactly on those."""
    return {("unet/" + k.removeprefix("ip_adapter/")) if k.startswith("ip_adapter/") else k: v
            for k, v in adapter_flat.items()}


def is_adapter_path(path: str) -> bool:
    """Whether a flat Stage2Model param path ("unet/.../attn2/to_k_ip/kernel") belongs to the colour adapter."""
    return path.startswith("image_proj/") or is_ip_kernel_path(path)


def build_stage2(model_config) -> Stage2Model:
    """The model described by a `configs/stage2.py` `model` section (run-time fields shared by all three)."""

    kw = runtime_kwargs(model_config, scan_layers=True)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(model_config["unet"]), "model.unet"), ip_adapter=True,
                                **kw)
    controlnet = ControlNetModel(ControlNetConfig.from_dict(dict(model_config["controlnet"]), "model.controlnet"),
                                 **kw)
    resampler = Resampler(ResamplerConfig.from_dict(dict(model_config["resampler"]), "model.resampler"),
                          dtype=kw["dtype"], param_dtype=kw["param_dtype"], attention_backend=kw["attention_backend"])
    return Stage2Model(unet, controlnet, resampler)
