"""Training losses of the phases, each over its models' applies: the autoencoder's reconstruction + KL loss (the
pretrained bases' first phase), stage 0's SwinIR L2 loss, v1's Eq. 4
with its encoders in the step, v2 stage 1's Eqs. 1-2 (joint UNet, then its ControlNet) and stage 2's Eqs. 3-4
over the composed `Stage2Model`.

The diffusion losses themselves (noising, eps/v/x0 targets, Eq. 4 of v1, v2's multi-branch Eq. 1) are pure
functions of arrays in `diffbody_jax.diffusion.losses`; these wrap a model's apply around them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.conditioning.body_priors import attention_from_mask, body_attention_map
from diffbody_jax.conditioning.clip_image import colour_adapter_features
from diffbody_jax.conditioning.prompts import sd21_prompt_embeds, sdxl_prompt_embeds, sdxl_time_ids
from diffbody_jax.diffusion.losses import (
    body_attention_loss,
    diffusion_loss,
    multi_branch_loss,
    noising,
    normalize_latent,
)
from diffbody_jax.models.bodypart import BodyPartNet, preprocess
from diffbody_jax.models.layers import Array
from diffbody_jax.models.stage2 import Stage2Model
from diffbody_jax.models.swinir import SwinIR, swinir_regress
from diffbody_jax.models.unet import SDXLText
from diffbody_jax.models.vae import AutoencoderKL, images_to_latents

STAGE2_PHASES = ("controlnet", "colour_adapter")


def autoencoder_loss(vae: AutoencoderKL, params: Mapping, images: Array, key: jax.Array, *,
                     kl_weight: float) -> tuple[Array, dict[str, Array]]:
    """The LDM autoencoder's loss without its perceptual and GAN terms: L1 reconstruction of a posterior sample
    plus kl_weight * KL(q(z|x) || N(0, I)).

    images: [B, H, W, 3] RGB in [0, 1] (compared in the VAE's [-1, 1]). As LDM's LPIPSWithDiscriminator writes
    it, both terms are summed over an image's elements and averaged over the batch (its kl_weight of 1e-6 is
    relative to those sums); with its learned output log-variance at its initial 0, the reconstruction term is the
    plain L1 sum. Metrics: "l1" (mean absolute error per element, in [-1, 1] units) and "kl" (per image).
    """
    x = images.astype(jnp.float32) * 2.0 - 1.0
    posterior = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    reconstruction = vae.apply({"params": params}, posterior.sample(key), method=AutoencoderKL.decode)
    error = jnp.abs(x - reconstruction.astype(jnp.float32))
    kl = 0.5 * jnp.sum(jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar,
                       axis=(1, 2, 3))
    loss = jnp.mean(jnp.sum(error, axis=(1, 2, 3))) + kl_weight * jnp.mean(kl)
    return loss, {"l1": jnp.mean(error), "kl": jnp.mean(kl)}


def swinir_l2_loss(module: SwinIR, params: dict, degraded: Array, target: Array, rng: jax.Array | None = None):
    """Stage-0 training loss: mean squared error between SwinIR(degraded) and the clean target (NHWC, [0, 1])."""
    rngs = None if rng is None else {"dropout": rng}
    restored = module.apply({"params": params}, degraded, deterministic=rng is None, rngs=rngs)
    if restored.shape != target.shape:
        raise ValueError(f"swinir_l2_loss: restored {restored.shape} and target {target.shape} differ")
    return jnp.mean(jnp.square(restored.astype(jnp.float32) - target.astype(jnp.float32)))


def body_part_loss(net: BodyPartNet, variables: Mapping[str, Any], images: Array, labels: Array, *,
                   label_smoothing: float = 0.1) -> tuple[Array, dict[str, Array]]:
    """The body-part network's pixel-classification loss: cross-entropy between its part probabilities (background
    and the K parts, at 1/4 of its input size) and the label map, smoothed as BPBreID's part loss is.

    images: [B, H, W, 3] RGB in [0, 1]; labels: [B, H, W, 1] part indices (0 background), taken at the classifier's
    resolution by nearest sampling. Metrics: "pixel_accuracy" and "foreground_iou" (1 - background vs the labels'
    person)."""
    out = net.apply(variables, preprocess(images, net.config))
    probs = out.part_probs.astype(jnp.float32)
    b, h, w, k = probs.shape
    target = jax.image.resize(labels.astype(jnp.float32), (b, h, w, 1), "nearest")[..., 0].astype(jnp.int32)
    smoothed = (1.0 - label_smoothing) * jax.nn.one_hot(target, k) + label_smoothing / k
    loss = -jnp.mean(jnp.sum(smoothed * jnp.log(jnp.clip(probs, 1e-8)), axis=-1))
    predicted = jnp.argmax(probs, axis=-1)
    person, found = target > 0, predicted > 0
    iou = jnp.sum(person & found) / jnp.maximum(jnp.sum(person | found), 1)
    return loss, {"pixel_accuracy": jnp.mean(predicted == target), "foreground_iou": iou}


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
    [B, T, D_clip] (CLIP of the adapter's image: I_ir or the target in training, config adapter.image; I_res when
    restoring). Returns (loss, {"loss", "t_mean"}). Differentiate it with respect to
    `training.phases.STAGE2_SUBSETS[phase]` (see `training.trainable.partition`).
    """
    if phase not in STAGE2_PHASES:
        raise ValueError(f"stage2_loss: phase {phase!r}; expected one of {STAGE2_PHASES}")
    if phase == "colour_adapter" and batch.get("image_features") is None:
        raise ValueError("stage2_loss: the colour_adapter phase needs batch['image_features'] (CLIP features)")
    x0 = batch["latents"]
    t, eps, z_t = noising(key, x0, alphas_cumprod, noise_offset)
    text = SDXLText(batch["prompt_embeds"], batch["text_embeds"], batch["time_ids"])
    image = batch["image_features"] if phase == "colour_adapter" else None
    pred = model.apply({"params": params}, z_t, t, text, batch["priors"], image, prior_mask=batch.get("prior_mask"))
    loss = diffusion_loss(pred, x0, eps, alphas_cumprod[t], prediction_type, min_snr_gamma=min_snr_gamma)
    return loss, {"loss": loss, "t_mean": t.astype(jnp.float32).mean()}


def _encode_image(group, variables, image: Array) -> Array:
    """Scaled VAE latents of an image in [0, 1] (`models.vae.images_to_latents`, as the pipelines encode)."""
    return images_to_latents(group.vae, variables["params"]["vae"], image)


def regress(group, variables, degraded: Array) -> Array:
    """I_reg / I_ir of the group's frozen SwinIR (`models.swinir.swinir_regress`, as the pipelines regress)."""
    return swinir_regress(group.swinir, group.member_variables(variables, "swinir"), degraded)


def _cached(batch: Mapping[str, Any], field: str, compute):
    """batch[field] when a `diffbody prepare` cache put it there, else compute()."""
    return batch[field] if field in batch else compute()


def sd21_cacheable(group, variables: Mapping[str, Any], batch: Mapping[str, Any], images: Sequence[str],
                   ) -> dict[str, Array]:
    """The encodings of an SD2.1 phase that do not change between epochs (fixed crop and caption):
    latents_<name> = E(image) for each name in `images` (rgb = the clean crop, depth, normal, pose; `branch_image`)
    and context = the text encoder's last hidden state of the caption."""
    out = {f"latents_{name}": _encode_image(group, variables, branch_image(batch, name)) for name in images}
    out["context"] = sd21_prompt_embeds(group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"])
    return out


def v1_cacheable(group, variables, batch):
    return sd21_cacheable(group, variables, batch, ("rgb", "pose"))


def stage1_cacheable(group, variables, batch):
    return sd21_cacheable(group, variables, batch, (*group.joint_unet.config.branches, "pose"))


# Where v1's I_attn comes from: the part network on I_reg in the step (Eq. 3), the manifest's precomputed map, or
# the manifest's person mask (`diffbody annotate --manifest`): an approximation of I_attn for when no part network
# weights exist (a silhouette, not the part network's per-part foreground).
V1_ATTENTION = ("model", "manifest", "mask")


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
    attention="manifest" also attention [B, H, W, 1] (a precomputed map in place of the part network's); with
    attention="mask" the person mask [B, H, W, 1] in its place (an approximation: see V1_ATTENTION).

      I_reg   = SwinIR(degraded)                                   (Eq. 2, clipped to [0, 1])
      I_attn  = Attn(I_reg) at latent resolution                   (Eq. 3: the part network's foreground)
      c       = [E(I_reg), E(I_pose), I_attn]                      (the ControlNet's latent condition)
      loss    = E ||(1 + I_attn) (eps - eps_theta(z_t, t, c_text, c))||^2   (Eq. 4, weight inside the square)
    """
    if attention not in V1_ATTENTION:
        raise ValueError(f"v1 attention source {attention!r}; expected one of {V1_ATTENTION}")
    factor = group.vae.config.downsample_factor
    i_reg = regress(group, variables, batch["degraded"])
    if attention == "model":
        i_attn = body_attention_map(group.bodypart, group.member_variables(variables, "bodypart"), i_reg,
                                    factor).latent
    else:
        i_attn = attention_from_mask(batch["attention" if attention == "manifest" else "mask"], factor).latent

    def encode(image):
        return _encode_image(group, variables, image)

    x0 = _cached(batch, "latents_rgb", lambda: encode(batch["target"]))
    pose = _cached(batch, "latents_pose", lambda: encode(batch["pose"]))
    condition = jnp.concatenate([encode(i_reg), pose, i_attn.astype(x0.dtype)], axis=-1)
    context = _cached(batch, "context", lambda: sd21_prompt_embeds(
        group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"]))
    t, eps, z_t = noising(key, x0, alphas_cumprod)
    residuals = group.apply("controlnet", variables, z_t, t, context, condition)
    pred = group.apply("unet", variables, z_t, t, context, down_residuals=residuals.down,
                       mid_residual=residuals.mid)
    loss = body_attention_loss(pred, x0, eps, alphas_cumprod[t], prediction_type, i_attn, weighting=weighting)
    return loss, {"t_mean": t.astype(jnp.float32).mean(), "attention_mean": i_attn.mean()}


# ------------------------------------------------------------------------------------------- v2 stage 1
def branch_image(batch: Mapping[str, Any], branch: str) -> Array:
    """The [B, H, W, 3] image in [0, 1] a joint-UNet branch denoises: the clean crop ("rgb"), the depth map
    repeated on three channels ("depth"), the normal map ("normal")."""
    if branch == "rgb":
        return batch["target"]
    image = batch[branch]
    return jnp.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def stage1_loss(
    group,
    variables: Mapping[str, Any],
    batch: Mapping[str, Any],
    key: jax.Array,
    alphas_cumprod: Array,
    *,
    branches: Sequence[str],
    prediction_type: str = "epsilon",
    latent_stats: Mapping[str, Sequence[float]] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """DiffBody v2 stage 1 (seed 002): Eq. 1 (no "controlnet" member in `group`) or Eq. 2 (with one).

    group: a `ModelGroup` with joint_unet, vae, text_encoder, and for Eq. 2 also controlnet and swinir.
    batch: target, pose, depth [B, H, W, 1], normal [B, H, W, 3] (all in [0, 1]), input_ids [B, 77]; Eq. 2 also
    degraded.

      c_p     = E(I_pose)                                  (normalised to the RGB statistics when latent_stats)
      x0_k    = E(I_k) for k in branches (rgb = the clean crop, depth, normal)
      z_k     = sqrt(a_t) x0_k + sqrt(1 - a_t) eps_k      (one t per example, eps_k independent per branch)
      z_hat   = [z_k, c_p] per branch, branch-major         (the joint UNet's n_branches x 8 input channels)
      Eq. 1:  sum_k ||target_k - eps_theta_k(z_hat, t, c_t)||^2
      Eq. 2:  the same with the ControlNet on c_r = E(I_ir), I_ir = SwinIR(degraded), seeing the RGB branch's
              input [z_rgb, c_p]; its residuals added in every branch (models/joint_unet.py routes them).

    The paper writes the sum over branches (the authors' code takes the mean over the 12 channels: a factor of
    1/3 on the same gradient direction). Returns (loss, {"t_mean", "loss_<branch>"...}).
    """

    def encode(name):  # cached by `diffbody prepare` (raw latents) or encoded here
        return _cached(batch, f"latents_{name}", lambda: _encode_image(group, variables, branch_image(batch, name)))

    def normalized(z, name):
        return z if latent_stats is None else normalize_latent(z, name, latent_stats)

    pose = normalized(encode("pose"), "pose")
    x0 = [normalized(encode(name), name) for name in branches]
    k_t, *k_branch = jax.random.split(key, len(branches) + 1)
    t = jax.random.randint(k_t, (pose.shape[0],), 0, alphas_cumprod.shape[0])
    eps, z_t = [], []
    for k, x in zip(k_branch, x0, strict=True):
        _, e, z = noising(k, x, alphas_cumprod, timesteps=t)
        eps.append(e)
        z_t.append(jnp.concatenate([z, pose.astype(z.dtype)], axis=-1))
    context = _cached(batch, "context", lambda: sd21_prompt_embeds(
        group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"]))
    residuals = {}
    if "controlnet" in group.members:
        i_ir = regress(group, variables, batch["degraded"])
        c_r = _encode_image(group, variables, i_ir)
        out = group.apply("controlnet", variables, z_t[list(branches).index("rgb")], t, context, c_r)
        residuals = dict(down_residuals=out.down, mid_residual=out.mid)
    pred = group.apply("joint_unet", variables, jnp.concatenate(z_t, axis=-1), t, context, **residuals)
    loss, parts = multi_branch_loss(pred, x0, eps, alphas_cumprod[t], prediction_type)
    metrics = {f"loss_{name}": parts[f"branch_{b}"] for b, name in enumerate(branches)}
    return loss, {"t_mean": t.astype(jnp.float32).mean(), **metrics}


# ------------------------------------------------------------------------------------------- v2 stage 2
COLOUR_IMAGE_SOURCES = ("ir", "target")


STAGE2_CACHED = ("latents", "prompt_embeds", "text_embeds")  # what `diffbody prepare` can encode once


def stage2_cacheable(group, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Array]:
    """The per-example encodings that do not change between epochs (given a fixed crop and caption): latents =
    E(target) [B, h, w, 4], prompt_embeds [B, 77, D] and pooled text_embeds [B, D_2] of SDXL's two encoders."""
    latents = _encode_image(group, variables, batch["target"])
    text = sdxl_prompt_embeds(group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"],
                              group.text_encoder_2, variables["params"]["text_encoder_2"], batch["input_ids_2"])
    return {"latents": latents, "prompt_embeds": text.prompt_embeds, "text_embeds": text.text_embeds}


def sdxl_encodings(group, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Array]:
    """What an SDXL UNet is fed besides its noisy latents, from the pipeline's batch: latents = E(target),
    prompt_embeds and pooled text_embeds (kept where a `diffbody prepare` cache put them, else encoded here) and
    time_ids = (original size, crop top-left, the crop's size) per example, SDXL's size conditioning."""
    out = {k: batch[k] for k in STAGE2_CACHED if k in batch}
    if len(out) < len(STAGE2_CACHED):
        out = {**stage2_cacheable(group, variables, batch), **out}
    b, h, w, _ = batch["target"].shape
    out["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], (h, w), b)
    return out


def stage2_inputs(group, variables: Mapping[str, Any], batch: Mapping[str, Any], *, adapter_image: str | None = None,
                  clip_fit: str = "auto") -> dict[str, Any]:
    """The frozen encoders of stage 2, in the step: the pipeline's batch -> `stage2_loss`'s batch.

    group: a `ModelGroup` with stage2, vae, text_encoder, text_encoder_2, swinir (and image_encoder for the colour
    adapter). batch: target, degraded, pose, normal [B, H, W, 3], depth [B, H, W, 1] (all in [0, 1]), input_ids and
    input_ids_2 [B, 77] (the two SDXL tokenizers), original_size and crop_top_left [B, 2] (H, W) / (top, left).
    Fields already present (latents, prompt_embeds, text_embeds: a `diffbody prepare` cache) are kept.

      latents   = E(target)                                          (SDXL's VAE, scaled)
      priors    = {ir: SwinIR(degraded) clipped, pose, depth (3 channels), normal}, at image resolution in [0, 1]
      text      = SDXL's prompt_embeds (both encoders' penultimate states), pooled text_embeds, and time_ids =
                  (original size, crop top-left, the crop's size) per example: SDXL's size conditioning
      image_features (adapter_image = "ir" | "target"): CLIP vision penultimate states of that image, the training
                  stand-in for I_res (stage 1's restoration, which needs a sampling run per example). Default "ir":
                  closest to I_res among what a step has; "target" is IP-Adapter's own training recipe.
    """
    out = sdxl_encodings(group, variables, batch)
    i_ir = regress(group, variables, batch["degraded"])
    depth = batch["depth"]
    out["priors"] = {"ir": i_ir, "pose": batch["pose"], "normal": batch["normal"],
                     "depth": jnp.repeat(depth, 3, axis=-1) if depth.shape[-1] == 1 else depth}
    if adapter_image is not None:
        if adapter_image not in COLOUR_IMAGE_SOURCES:
            raise ValueError(f"colour adapter image {adapter_image!r}; expected one of {COLOUR_IMAGE_SOURCES}")
        image = i_ir if adapter_image == "ir" else batch["target"]
        out["image_features"] = colour_adapter_features(group.image_encoder, variables["params"]["image_encoder"],
                                                        image, fit=clip_fit)
    return out


def stage2_phase_loss(group, variables: Mapping[str, Any], batch: Mapping[str, Any], key: jax.Array,
                      alphas_cumprod: Array, phase: str, *, adapter_image: str = "ir", clip_fit: str = "auto",
                      **loss_kw):
    """Eq. 3 / Eq. 4 (`stage2_loss`) on the batch `stage2_inputs` makes from the pipeline's batch."""
    inputs = stage2_inputs(group, variables, batch, adapter_image=adapter_image if phase == "colour_adapter" else None,
                           clip_fit=clip_fit)
    return stage2_loss(group.stage2, variables["params"]["stage2"], inputs, key, alphas_cumprod, phase, **loss_kw)


# ------------------------------------------------------------------------------------------- base UNet
def base_unet_cacheable(group, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Array]:
    """A base UNet phase's per-example encodings: SD2.1's latents_rgb and context (`sd21_cacheable`), or SDXL's
    latents, prompt_embeds and text_embeds (`stage2_cacheable`) when the group has text_encoder_2."""
    if "text_encoder_2" in group.members:
        return stage2_cacheable(group, variables, batch)
    return sd21_cacheable(group, variables, batch, ("rgb",))


def base_unet_loss(
    group,
    variables: Mapping[str, Any],
    batch: Mapping[str, Any],
    key: jax.Array,
    alphas_cumprod: Array,
    *,
    prediction_type: str = "epsilon",
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The text-conditional latent diffusion loss of a pretrained base (SD2.1-like or, with a text_encoder_2
    member, SDXL-like): E ||target - unet(z_t, t, c_text)||^2, target eps or v by `prediction_type`.

    group: unet, vae, text_encoder (and text_encoder_2), all frozen but the UNet. batch: target [B, H, W, 3] in
    [0, 1], input_ids [B, 77] (captions already dropped to "" by the host hook with text.drop_prob, which is what
    makes classifier-free guidance mean something); SDXL also input_ids_2 and original_size / crop_top_left [B, 2]
    for its size conditioning (`sdxl_time_ids`, as stage 2 and the v2 pipeline build it)."""
    cond = {}
    if "text_encoder_2" in group.members:
        encoded = sdxl_encodings(group, variables, batch)
        x0, context = encoded["latents"], encoded["prompt_embeds"]
        cond = dict(text_embeds=encoded["text_embeds"], time_ids=encoded["time_ids"])
    else:
        x0 = _cached(batch, "latents_rgb", lambda: _encode_image(group, variables, batch["target"]))
        context = _cached(batch, "context", lambda: sd21_prompt_embeds(
            group.text_encoder, variables["params"]["text_encoder"], batch["input_ids"]))
    t, eps, z_t = noising(key, x0, alphas_cumprod, noise_offset)
    pred = group.apply("unet", variables, z_t, t, context, **cond)
    loss = diffusion_loss(pred, x0, eps, alphas_cumprod[t], prediction_type, min_snr_gamma=min_snr_gamma)
    return loss, {"t_mean": t.astype(jnp.float32).mean()}
