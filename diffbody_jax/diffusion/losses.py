"""Training losses of DiffBody as pure functions of arrays (NHWC latents, float32 statistics).

    t, eps, z_t = noising(key, x0, alphas_cumprod, noise_offset=0.05)
    pred = model(z_t, t, ...)
    loss = diffusion_loss(pred, x0, eps, alphas_cumprod[t], "v_prediction")
    loss = body_attention_loss(pred, x0, eps, alphas_cumprod[t], "epsilon", attn)   # DiffBody v1, Eq. 4

v1 (seed 000, Eq. 4) is ||(1 + I_attn) * (eps - eps_theta)||^2: the factor sits inside the square, so each
latent pixel's squared error is weighted by (1 + I_attn)^2, from 1 (background) to 4 (body): `body_attention_loss`.
v2 (seed 002, Eq. 1) sums one loss per branch (RGB, depth, normal), each branch noised independently:
`multi_branch_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from diffbody_jax.diffusion.schedule import q_sample, velocity

Array = jax.Array


def noising(key: jax.Array, x0: Array, alphas_cumprod: Array, noise_offset: float = 0.0,
            timesteps: Array | None = None) -> tuple[Array, Array, Array]:
    """Draw t ~ U{0..T-1} per example and eps ~ N(0, I), and noise x0: returns (t [B], eps, z_t).

    noise_offset: adds noise_offset * N(0, 1) per example and channel (constant over the image), which lets a
    model learn overall brightness shifts. timesteps: fixed [B] timesteps instead of drawn ones.
    """
    k_t, k_eps, k_off = jax.random.split(key, 3)
    b, c = x0.shape[0], x0.shape[-1]
    if timesteps is None:
        timesteps = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    if noise_offset:
        eps = eps + noise_offset * jax.random.normal(k_off, (b,) + (1,) * (x0.ndim - 2) + (c,), jnp.float32)
    a = _per_example(alphas_cumprod[timesteps], x0.ndim)
    return timesteps, eps, q_sample(x0.astype(jnp.float32), eps, a)


def _per_example(values: Array, ndim: int) -> Array:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def target(x0: Array, eps: Array, alpha_bar: Array, prediction_type: str) -> Array:
    """What the model is trained to output: eps, v = sqrt(a) eps - sqrt(1 - a) x0, or x0 ("sample")."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return velocity(x0, eps, alpha_bar)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r}; expected epsilon, v_prediction or sample")


def snr(alpha_bar: Array) -> Array:
    """Signal-to-noise ratio a / (1 - a)."""
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(alpha_bar: Array, gamma: float, prediction_type: str) -> Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per example, for the prediction type's loss.

    eps: min(SNR, g) / SNR; v: min(SNR, g) / (SNR + 1); x0: min(SNR, g). These are the weights diffusers'
    training scripts use (`compute_snr`), so that each prediction type gets the same x0-space weighting.
    """
    s = snr(alpha_bar)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def diffusion_loss(
    prediction: Array,
    x0: Array,
    eps: Array,
    alpha_bar: Array,
    prediction_type: str,
    *,
    weight_map: Array | None = None,
    min_snr_gamma: float | None = None,
) -> Array:
    """Mean squared error of one prediction, in float32; returns a scalar.

    prediction, x0, eps: [B, H, W, C]. alpha_bar: [B] (alphas_cumprod at each example's t).
    weight_map: [B, H, W, 1] or [B, H, W, C] per-pixel weights on the squared error (DiffBody v1's Eq. 4 is
      `body_attention_loss`, weight (1 + I_attn)^2); the mean is over all elements of weight * error, so a map of
      ones equals no map.
    min_snr_gamma: weight each example by `min_snr_weight` (off when None).
    """
    a = _per_example(alpha_bar, x0.ndim)
    err = jnp.square(prediction.astype(jnp.float32) - target(x0.astype(jnp.float32), eps, a, prediction_type))
    if weight_map is not None:
        if weight_map.shape[:-1] != err.shape[:-1] or weight_map.shape[-1] not in (1, err.shape[-1]):
            raise ValueError(f"weight_map: shape {tuple(weight_map.shape)} does not fit the latents {tuple(err.shape)}")
        err = err * weight_map.astype(jnp.float32)
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    if min_snr_gamma is not None:
        per_example = per_example * min_snr_weight(alpha_bar, min_snr_gamma, prediction_type)
    return per_example.mean()


ATTENTION_WEIGHTINGS = ("squared", "linear")


def body_attention_loss(
    prediction: Array,
    x0: Array,
    eps: Array,
    alpha_bar: Array,
    prediction_type: str,
    attention: Array,
    *,
    weighting: str = "squared",
    min_snr_gamma: float | None = None,
) -> Array:
    """DiffBody v1's training loss (seed 000, Eq. 4): mean of ((1 + I_attn) * (target - prediction))^2.

    attention: I_attn at latent resolution, [B, H, W, 1] (or [B, H, W, C]), in [0, 1].
    weighting: "squared" (default, Eq. 4 as written: the weight is inside the norm, so the squared error is
      weighted by (1 + I_attn)^2, 1 to 4); "linear" weights the squared error by (1 + I_attn) (1 to 2), a
      config choice that is not the paper's. The mean runs over all B * H * W * C elements, as
      `diffusion_loss` does, so an all-zero map gives the plain loss.
    """
    if weighting not in ATTENTION_WEIGHTINGS:
        raise ValueError(f"body_attention_loss: weighting={weighting!r}; expected one of {ATTENTION_WEIGHTINGS}")
    w = 1.0 + attention.astype(jnp.float32)
    return diffusion_loss(prediction, x0, eps, alpha_bar, prediction_type,
                          weight_map=jnp.square(w) if weighting == "squared" else w, min_snr_gamma=min_snr_gamma)


def multi_branch_loss(
    prediction: Array,
    x0: Sequence[Array],
    eps: Sequence[Array],
    alpha_bar: Array,
    prediction_type: str,
    *,
    branch_weights: Sequence[float] | None = None,
    weight_map: Array | None = None,
    min_snr_gamma: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """v2 stage 1 (Eq. 1): sum over branches of each branch's loss; returns (total, per-branch losses).

    prediction: [B, H, W, n_branches * C], branch-major as `JointUNet` returns it. x0, eps: one [B, H, W, C]
    per branch (each branch noised with its own eps, the same t). branch_weights: default all 1.
    """
    n = len(x0)
    if len(eps) != n or prediction.shape[-1] % n:
        raise ValueError(f"multi_branch_loss: {n} x0, {len(eps)} eps, prediction with {prediction.shape[-1]} channels")
    weights = branch_weights if branch_weights is not None else (1.0,) * n
    parts = {}
    for b, (pred, x, e) in enumerate(zip(jnp.split(prediction, n, axis=-1), x0, eps, strict=True)):
        parts[f"branch_{b}"] = diffusion_loss(pred, x, e, alpha_bar, prediction_type, weight_map=weight_map,
                                              min_snr_gamma=min_snr_gamma)
    total = sum(w * parts[f"branch_{b}"] for b, w in enumerate(weights))
    return total, parts


# The authors' dataset statistics of SD VAE latents (scaled) per prior (their --normalize_dist): mean, std.
AUTHORS_LATENT_STATS = {"rgb": (0.14654, 1.03744), "depth": (0.21360, 1.20629), "normal": (0.60303, 0.91429),
                        "pose": (-0.25994, 1.38366)}


def normalize_latent(z: Array, name: str, stats: Mapping[str, Sequence[float]], inverse: bool = False) -> Array:
    """Move a prior's latent to the RGB latents' statistics: (z - m_prior) / s_prior * s_rgb + m_rgb (identity for
    "rgb"); inverse=True maps a branch's latent back to its prior's statistics (before decoding it)."""
    if name == "rgb":
        return z
    (mean, std), (rgb_mean, rgb_std) = stats[name], stats["rgb"]
    if inverse:
        return (z - rgb_mean) / rgb_std * std + mean
    return (z - mean) / std * rgb_std + rgb_mean
