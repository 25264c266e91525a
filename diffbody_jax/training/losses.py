"""Training losses of the DiffBody models that are not plain diffusion losses of one denoiser:
stage 0's SwinIR L2 loss and stage 2's Eqs. 3-4 over the composed `Stage2Model`.

The diffusion losses themselves (noising, eps/v/x0 targets, Eq. 4 of v1, v2's multi-branch Eq. 1) are pure
functions of arrays in `diffbody_jax.diffusion.losses`; these wrap a model's apply around them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.body_priors import body_attention_map
from diffbody_jax.conditioning.prompts import sd21_prompt_embeds
from diffbody_jax.diffusion.losses import body_attention_loss, diffusion_loss, noising
from diffbody_jax.models.layers import Array
from diffbody_jax.models.stage2 import Stage2Model
from diffbody_jax.models.swinir import SwinIR
from diffbody_jax.models.unet import SDXLText

STAGE2_PHASES = ("controlnet", "colour_adapter")


def swinir_l2_loss(module: SwinIR, params: dict, degraded: Array, target: Array, rng: jax.Array | None = None):
    """Stage-0 training loss: mean squared error between SwinIR(degraded) and the clean target (NHWC, [0, 1])."""
    rngs = None if rng is None else {"dropout": rng}
    restored = module.apply({"params": params}, degraded, deterministic=rng is None, rngs=rngs)
    if restored.shape != target.shape:
        raise ValueError(f"swinir_l2_loss: restored {restored.shape} and target {target.shape} differ")
    return jnp.mean(jnp.square(restored.astype(jnp.float32) - target.astype(jnp.float32)))


def stage2_loss(
    model: Stage2Model,
    params: Mapping,
    batch: Mapping[str, Any],
    key: jax.Array,
    alphas_cumprod: Array,
    phase: str,
    *,
    prediction_type: str = "epsilon",
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Eq. 3 (phase "controlnet") or Eq. 4 ("colour_adapter"): E ||eps - eps_theta(z_t, t, c_t, [c_i,] c_g)||^2.

    batch: latents [B, H, W, 4] (VAE latents of the HQ image, scaled), prompt_embeds, text_embeds, time_ids,
    priors {name: [B, 8H, 8W, C_i]}, optional prior_mask [B, P]; "colour_adapter" also image_features
    [B, T, D_clip] (CLIP of I_res). Returns (loss, {"loss", "t_mean"}). Differentiate it with respect to
    `training.phases.STAGE2_SUBSETS[phase]` (see `training.trainable.partition`).
    """
    if phase not in STAGE2_PHASES:
        raise ValueError(f"stage2_loss: phase {phase!r}; expected one of {STAGE2_PHASES}")
    if phase == "colour_adapter" and batch.get("image_features") is None:
        raise ValueError("stage2_loss: the colour_adapter phase needs batch['image_features'] (CLIP of I_res)")
    x0 = batch["latents"]
    t, eps, z_t = noising(key, x0, alphas_cumprod, noise_offset)
    text = SDXLText(batch["prompt_embeds"], batch["text_embeds"], batch["time_ids"])
    image = batch["image_features"] if phase == "colour_adapter" else None
    pred = model.apply({"params": params}, z_t, t, text, batch["priors"], image, prior_mask=batch.get("prior_mask"))
    loss = diffusion_loss(pred, x0, eps, alphas_cumprod[t], prediction_type, min_snr_gamma=min_snr_gamma)
    return loss, {"loss": loss, "t_mean": t.astype(jnp.float32).mean()}


V1_ATTENTION = ("model", "manifest")


def v1_controlnet_loss(
    group,
    variables: Mapping[str, Any],
    batch: Mapping[str, Any],
    key: jax.Array,
    alphas_cumprod: Array,
    *,
    prediction_type: str = "epsilon",
    weighting: str = "squared",
    attention: str = "model",
) -> tuple[Array, dict[str, Array]]:
    """DiffBody v1 (seed 000): Eq. 2's I_reg, Eq. 3's condition and Eq. 4's loss, with every encoder in the step.

    group: a `ModelGroup` with members unet, controlnet, vae, text_encoder, swinir, bodypart (all frozen but the
    ControlNet). batch: degraded, target, pose [B, H, W, 3] in [0, 1], input_ids [B, 77]; with
    attention="manifest" also attention [B, H, W, 1] (a precomputed map in place of the part network's).

      I_reg   = SwinIR(degraded)                                   (Eq. 2, clipped to [0, 1])
      I_attn  = Attn(I_reg) at latent resolution                   (Eq. 3: the part network's foreground)
      c       = [E(I_reg), E(I_pose), I_attn]                      (the ControlNet's latent condition)
      loss    = E ||(1 + I_attn) (eps - eps_theta(z_t, t, c_text, c))||^2   (Eq. 4, weight inside the square)
    """
    if attention not in V1_ATTENTION:
        raise ValueError(f"v1 attention source {attention!r}; expected one of {V1_ATTENTION}")
    factor = 2 ** (len(group.vae.config.block_out_channels) - 1)
    i_reg = jnp.clip(group.apply("swinir", variables, batch["degraded"]), 0.0, 1.0)
    if attention == "model":
        i_attn = body_attention_map(group.bodypart, group.member_variables(variables, "bodypart"), i_reg,
                                    factor).latent
    else:
        b, h, w, _ = batch["attention"].shape
        i_attn = jax.image.resize(batch["attention"], (b, h // factor, w // factor, 1), "linear", antialias=True)

    def encode(image):
        return group.apply("vae", variables, image * 2.0 - 1.0, method="encode_latents")

    x0 = encode(batch["target"])
    condition = jnp.concatenate([encode(i_reg), encode(batch["pose"]), i_attn.astype(x0.dtype)], axis=-1)
    context = sd21_prompt_embeds(group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"])
    t, eps, z_t = noising(key, x0, alphas_cumprod)
    residuals = group.apply("controlnet", variables, z_t, t, context, condition)
    pred = group.apply("unet", variables, z_t, t, context, down_residuals=residuals.down,
                       mid_residual=residuals.mid)
    loss = body_attention_loss(pred, x0, eps, alphas_cumprod[t], prediction_type, i_attn, weighting=weighting)
    return loss, {"t_mean": t.astype(jnp.float32).mean(), "attention_mean": i_attn.mean()}
