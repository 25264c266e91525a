"""Part-loss guidance of DiffBody v1 (seed 000, Eq. 6 and Algorithm 1).

The part loss compares the body-part features H_k of the decoded x0 estimate with those of the regressed
image I_reg, part by part, and sums over the parts as Eq. 6 writes it:

    L_part(image b) = sum_k w_k d(H_k(x_hat_b), H_k(I_reg_b)),   w_k = 1 (default, `visibility="none"`)

Weighting the parts by how visible they are in I_reg (`visibility="continuous"` or `"binary"`) is our option,
not the paper's. Algorithm 1 guides each image by the gradient of its own loss, so the guidance function
returns one loss per image and the sampler differentiates their sum: a batch of B guides each image exactly
as it would be guided alone (a batch mean would divide every image's gradient by B).

d is chosen in `PartLossConfig.distance`:
  "ce"      the paper's cross-entropy: softmax over the feature dimension of each part (temperature tau),
            I_reg's distribution as the target. We subtract the target's entropy (a constant for x_hat),
            i.e. use KL(p_reg || p_hat): the same gradient, and zero when the two images agree.
  "cosine"  1 - cos(H_k(x_hat), H_k(I_reg))
  "l2"      mean squared difference of the part features

In the sampler the loss is taken on the VAE decode of x0_hat, all in one jitted program:

    guidance = make_part_guidance(vae, net, PartLossConfig())
    aux = part_guidance_aux(net, net_variables, vae_params, i_reg)   # I_reg's features, computed once
    sampler = make_sampler(model_fn, schedule, SamplerConfig(guidance_scale=s), guidance)
    out = sampler(key, z_T, cond, aux=aux, params=unet_params)

Build the VAE with `remat=True` so that the backward pass through a 512 x 512 decode keeps only block
boundaries (bench/part_guidance_memory.py measures the peak).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffbody_jax.models.bodypart import BodyPartNet, BodyPartOutput, preprocess
from diffbody_jax.models.vae import AutoencoderKL, latents_to_images

Array = jax.Array
DISTANCES = ("ce", "cosine", "l2")
VISIBILITY = ("continuous", "binary", "none")


@dataclasses.dataclass(frozen=True)
class PartLossConfig:
    """distance: "ce" | "cosine" | "l2" (see the module docstring). temperature: tau of "ce".
    visibility: part weights w_k: all ones ("none", the default: Eq. 6 sums the parts unweighted), or from
    I_reg, its largest part probability ("continuous") or whether the part wins any pixel ("binary", BPBreID's
    test-time score)."""

    distance: str = "ce"
    temperature: float = 1.0
    visibility: str = "none"

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"PartLossConfig: distance={self.distance!r}; supported: {DISTANCES}")
        if self.visibility not in VISIBILITY:
            raise ValueError(f"PartLossConfig: visibility={self.visibility!r}; supported: {VISIBILITY}")
        if not self.temperature > 0:
            raise ValueError(f"PartLossConfig: temperature={self.temperature} must be positive")


def part_weights(target: BodyPartOutput, visibility: str) -> Array:
    """[B, K] weights of the parts in the reference image."""
    if visibility == "none":
        return jnp.ones(target.visibility.shape, jnp.float32)
    if visibility == "continuous":
        return target.visibility
    k = target.visibility.shape[-1]
    winner = jnp.argmax(target.part_probs, axis=-1)  # [B, h, w] in 0..K (0: background)
    return jnp.stack([jnp.any(winner == i + 1, axis=(1, 2)) for i in range(k)], -1).astype(jnp.float32)


def part_distances(pred: BodyPartOutput, target: BodyPartOutput, config: PartLossConfig) -> Array:
    """[B, K] distance per part between the prediction's and the reference's part features."""
    f_hat, f_ref = pred.part_features, jax.lax.stop_gradient(target.part_features)
    if config.distance == "ce":
        log_q = jax.nn.log_softmax(f_hat / config.temperature, axis=-1)
        log_p = jax.nn.log_softmax(f_ref / config.temperature, axis=-1)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if config.distance == "cosine":
        cos = jnp.sum(pred.part_embeddings * jax.lax.stop_gradient(target.part_embeddings), axis=-1)
        return 1.0 - cos
    return jnp.mean((f_hat - f_ref) ** 2, axis=-1)


def part_losses_per_image(pred: BodyPartOutput, target: BodyPartOutput, config: PartLossConfig) -> Array:
    """[B]: Eq. 6 for each image, the (weighted) sum over parts of the part distances."""
    weights = jax.lax.stop_gradient(part_weights(target, config.visibility))
    return jnp.sum(weights * part_distances(pred, target, config), axis=-1)


def part_loss_from_outputs(pred: BodyPartOutput, target: BodyPartOutput, config: PartLossConfig) -> Array:
    """Scalar: `part_losses_per_image` averaged over the batch (for reporting; guidance uses the per-image losses)."""
    return jnp.mean(part_losses_per_image(pred, target, config))


def part_loss(net: BodyPartNet, variables: dict, x_hat: Array, i_reg: Array,
              config: PartLossConfig = PartLossConfig()) -> Array:
    """Eq. 6 between two batches of RGB images in [0, 1], [B, H, W, 3] (any size; resized for the network).
    Differentiable in x_hat; I_reg is a constant."""
    target = net.apply(variables, preprocess(jax.lax.stop_gradient(i_reg), net.config))
    pred = net.apply(variables, preprocess(x_hat, net.config))
    return part_loss_from_outputs(pred, target, config)


def part_guidance_aux(net: BodyPartNet, variables: dict, vae_params: dict, i_reg: Array) -> dict[str, Any]:
    """What the guidance function reads: the two networks' variables and I_reg's part features (once)."""
    target = net.apply(variables, preprocess(i_reg, net.config))
    return {"vae": vae_params, "bodypart": variables, "target": target}


def decode_to_unit_range(vae: AutoencoderKL, vae_params: dict, z: Array) -> Array:
    """Scaled latents -> RGB in [0, 1]: `latents_to_images` without its clip, so the gradient survives at the
    range's edges (the pipeline's decode clips; the guidance's loss sees the unclipped estimate)."""
    return latents_to_images(vae, vae_params, z, clip=False)


def make_part_guidance(vae: AutoencoderKL, net: BodyPartNet,
                       config: PartLossConfig = PartLossConfig()) -> Callable[[Array, Array, Any], Array]:
    """`guidance_loss(x0_hat, t, aux) -> [B]` for `make_sampler`: decode x0_hat with the VAE, then each image's
    part loss against `aux["target"]` (from `part_guidance_aux`)."""

    def guidance_loss(x0_hat: Array, t: Array, aux: dict[str, Any]) -> Array:
        del t
        image = decode_to_unit_range(vae, aux["vae"], x0_hat)
        pred = net.apply(aux["bodypart"], preprocess(image, net.config))
        return part_losses_per_image(pred, aux["target"], config)

    return guidance_loss
