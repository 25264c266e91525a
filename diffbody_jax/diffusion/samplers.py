"""Samplers as one `jax.lax.scan` over steps inside one jitted function: DDPM, DDIM and DPM-Solver++(2M), with
classifier-free guidance and DiffBody's gradient guidance (seed 000, Algorithm 1). Each matches the diffusers
scheduler of the same name step for step (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler with its
defaults: dpmsolver++, order 2, midpoint, final sigma zero).

    model_fn = lambda params, z, t, cond: unet.apply({"params": params}, z, t, cond)
    sampler = make_sampler(model_fn, schedule, SamplerConfig(method="ddpm", num_steps=50, cfg_scale=4.0))
    out = sampler(key, z_T, cond, uncond, params=params)   # out.sample: z_0; out.x0_trajectory when asked

`model_fn(params, z_t, t, cond) -> output` is any pure function of the params (a UNet's apply, a UNet plus
ControlNet with {"unet": ..., "controlnet": ...}, ...): z_t [B, H, W, C] NHWC, t [B] int32, cond any pytree with a
leading batch axis. Its output is eps, v or x0 as `schedule.prediction_type` says. The params are an argument
of the jitted sampler, never closed over: closed-over arrays would become constants of the compiled program
(gigabytes of HLO at SDXL size, slow compiles, no param sharding); as arguments they keep their shardings.

Gradient guidance: `guidance_loss(x0_hat, t, aux) -> [B]` per-image losses (e.g. the VAE decoder and a
part-feature network, all traced into the same program; a scalar is taken as the sum of the images' losses).
At each step inside the guidance window the gradient of their sum with respect to z_t, through the model, is
scaled and subtracted from the step's mean before noise is added: z_{t-1} ~ N(mu(z_t) - s_t grad, sigma_t^2).
Algorithm 1 is per image, and the images of a batch do not interact, so each image moves by the gradient of
its own loss whatever the batch size (a batch mean would weaken the guidance B-fold). Outside the window no
gradient is computed (lax.cond).

Each step's noise is `jax.random.normal(fold_in(key, i), shape)` (`step_noise`), so a run is reproducible
from its key and tests can hand diffusers the same noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.diffusion.schedule import NoiseSchedule, predict_eps, predict_x0, q_sample

Array = jax.Array
METHODS = ("ddpm", "ddim", "dpmpp_2m")
GUIDANCE_SCHEDULES = ("constant", "linear", "sqrt_one_minus_alpha_bar")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static choices of a sampler; changing one recompiles, changing inputs does not.

    cfg_scale: classifier-free guidance scale (1.0: off, the unconditional pass is skipped).
    guidance_scale: s of Algorithm 1 (0.0: off). The gradient is applied while
      guidance_start >= t / num_train_timesteps >= guidance_end (the window, in diffusion time; 1.0 = pure
      noise), scaled per step by `guidance_schedule`: constant s, linear (s at the window's start to 0 at its
      end) or sqrt_one_minus_alpha_bar (s * sqrt(1 - a_t), larger at noisier steps).
    strength: < 1.0 starts from `x0_init` noised to the step int(num_steps * strength) from the end
      (img2img); the sampler then runs that many steps.
    eta: DDIM's stochasticity (0: deterministic).
    use_clipped_model_output: DDIM with `schedule.clip_sample`: re-derive eps from the clipped x0 (GLIDE's
      choice), as diffusers' `DDIMScheduler.step(use_clipped_model_output=True)`. Off (diffusers' default): x0
      is clipped, eps stays the model's.
    return_trajectory: also return z and the x0 estimate after every step ([N, B, H, W, C] scan outputs).
    """

    method: str = "ddpm"
    num_steps: int = 50
    eta: float = 0.0
    use_clipped_model_output: bool = False
    cfg_scale: float = 1.0
    guidance_scale: float = 0.0
    guidance_start: float = 1.0
    guidance_end: float = 0.0
    guidance_schedule: str = "constant"
    strength: float = 1.0
    return_trajectory: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SamplerConfig: method={self.method!r}; supported: {METHODS}")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"SamplerConfig: guidance_schedule={self.guidance_schedule!r}; "
                             f"supported: {GUIDANCE_SCHEDULES}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"SamplerConfig: strength={self.strength} must be in (0, 1]")


class SampleOutput(NamedTuple):
    sample: Array  # z_0 estimate after the last step, [B, H, W, C]
    trajectory: Array | None = None  # [N, B, H, W, C]: z after each step, when return_trajectory
    x0_trajectory: Array | None = None  # [N, B, H, W, C]: each step's x0 estimate, when return_trajectory


def step_noise(key: jax.Array, step: int | Array, shape, dtype=jnp.float32) -> Array:
    """The noise the sampler adds at scan step `step` (also used for the start noise at step -1)."""
    return jax.random.normal(jax.random.fold_in(key, step + 1), shape, dtype)


def dpm_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's timesteps: num_steps + 1 points of the spacing with the last dropped."""
    n = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1]
    elif schedule.timestep_spacing == "leading":
        ts = (np.arange(num_steps + 1) * (n // (num_steps + 1))).round()[::-1][:-1] + schedule.steps_offset
    else:
        ts = np.arange(n, 0, -n / num_steps).round() - 1
    return ts.astype(np.int32)


def _step_tables(schedule: NoiseSchedule, config: SamplerConfig) -> dict[str, np.ndarray]:
    """Per-step constants computed on the host: timesteps, alpha bars, DPM sigmas and guidance weights."""
    ac32 = schedule.alphas_cumprod()
    ac = ac32.astype(np.float64)
    if config.method == "dpmpp_2m":
        ts = dpm_timesteps(schedule, config.num_steps)
        sigmas = np.sqrt((np.float32(1) - ac32) / ac32)  # float32, as diffusers computes them
        sig = np.append(np.interp(ts, np.arange(len(sigmas)), sigmas), 0.0).astype(np.float32)
        prev = ts  # unused by the DPM update
        final = 1.0
    elif config.method == "ddpm":
        ts = schedule.timesteps(config.num_steps)
        prev = np.append(ts[1:], -1)  # DDPMScheduler.previous_timestep
        final = 1.0
    else:
        ts = schedule.timesteps(config.num_steps)
        prev = ts - schedule.num_train_timesteps // config.num_steps
        final = 1.0 if schedule.set_alpha_to_one else ac[0]
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    frac = ts / schedule.num_train_timesteps
    active = (frac <= config.guidance_start) & (frac >= config.guidance_end)
    if config.guidance_schedule == "constant":
        w = np.ones_like(frac)
    elif config.guidance_schedule == "linear":
        span = max(config.guidance_start - config.guidance_end, 1e-12)
        w = (frac - config.guidance_end) / span
    else:
        w = np.sqrt(1 - a_t)
    n = len(ts)
    n_run = int(n * config.strength) if config.strength < 1.0 else n
    first = n - n_run
    tables = dict(t=ts, a_t=a_t, a_prev=a_prev, g=np.where(active, config.guidance_scale * w, 0.0),
                  index=np.arange(n))
    if config.method == "dpmpp_2m":
        # First order on the first step run (no previous x0) and on the last (final sigma zero), else second.
        order = np.full(n, 2)
        order[first] = order[-1] = 1
        tables.update(sigma_s0=sig[:-1], sigma_t=sig[1:], sigma_s1=np.append(sig[:1], sig[:-2]), order=order)
    return {k: v[first:] for k, v in tables.items()}


def _dpm_alpha_sigma(sigma):
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _dpmpp_2m_update(z, x0, prev_x0, xs):
    """DPM-Solver++ multistep update (midpoint), first order where xs["order"] == 1."""
    alpha_t, sigma_t = _dpm_alpha_sigma(xs["sigma_t"])
    alpha_s0, sigma_s0 = _dpm_alpha_sigma(xs["sigma_s0"])
    alpha_s1, sigma_s1 = _dpm_alpha_sigma(xs["sigma_s1"])
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    h = lambda_t - lambda_s0
    first = (sigma_t / sigma_s0) * z - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
    r0 = (lambda_s0 - lambda_s1) / h
    d1 = (1.0 / r0) * (x0 - prev_x0)
    second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    return jnp.where(xs["order"] == 1, first, second)


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def make_sampler(
    model_fn: Callable[[Any, Array, Array, Any], Array],
    schedule: NoiseSchedule,
    config: SamplerConfig,
    guidance_loss: Callable[[Array, Array, Any], Array] | None = None,
    on_step: Callable[[Array], None] | None = None,
) -> Callable[..., SampleOutput]:
    """A jitted `sampler(key, z_T, cond, uncond=None, aux=None, x0_init=None, params=None) -> SampleOutput`.

    on_step: called on the host with each step's index (0 first) as the scan runs (`jax.debug.callback`): a
    progress bar's hook; None adds nothing to the program.

    params: what `model_fn` takes first (any pytree; sharded arrays keep their sharding).
    z_T: [B, H, W, C] start noise (ignored when strength < 1: then x0_init is noised with step_noise(key, -1)).
    uncond: the negative / null condition for classifier-free guidance (same structure as cond).
    aux: anything `guidance_loss` reads (e.g. I_reg and the part network's params).
    """
    if config.guidance_scale and guidance_loss is None:
        raise ValueError("SamplerConfig.guidance_scale is set but no guidance_loss was given")
    tables = {k: jnp.asarray(v, jnp.int32 if k in ("t", "index", "order") else jnp.float32)
              for k, v in _step_tables(schedule, config).items()}
    ptype = schedule.prediction_type
    guided = bool(config.guidance_scale) and bool(np.any(np.asarray(tables["g"]) != 0))

    def model_output(params, z, t, cond, uncond):
        tb = jnp.full((z.shape[0],), t, jnp.int32)
        if config.cfg_scale == 1.0:
            return model_fn(params, z, tb, cond)
        both = model_fn(params, jnp.concatenate([z, z]), jnp.concatenate([tb, tb]), _concat(uncond, cond))
        out_uncond, out_cond = jnp.split(both, 2)
        return out_uncond + config.cfg_scale * (out_cond - out_uncond)

    def estimate(params, z, t, a_t, cond, uncond):
        out = model_output(params, z, t, cond, uncond)
        x0 = predict_x0(out, z, a_t, ptype)
        if schedule.clip_sample:
            x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
        return x0, out

    def step(carry, xs, params, key, cond, uncond, aux):
        z, prev_x0 = carry
        t, a_t, a_prev, g, i = xs["t"], xs["a_t"], xs["a_prev"], xs["g"], xs["index"]
        if guided:
            def with_grad(z):
                def loss(z):
                    x0, out = estimate(params, z, t, a_t, cond, uncond)
                    return jnp.sum(guidance_loss(x0, t, aux)), (x0, out)

                (_, (x0, out)), grad = jax.value_and_grad(loss, has_aux=True)(z)
                return x0, out, grad

            def without(z):
                x0, out = estimate(params, z, t, a_t, cond, uncond)
                return x0, out, jnp.zeros_like(z)

            x0, out, grad = jax.lax.cond(g != 0, with_grad, without, z)
        else:
            x0, out = estimate(params, z, t, a_t, cond, uncond)
            grad = None

        std = None
        if config.method == "ddpm":
            beta_t, beta_prev = 1 - a_t, 1 - a_prev
            alpha_step = a_t / a_prev
            mean = (jnp.sqrt(a_prev) * (1 - alpha_step) / beta_t) * x0 + (jnp.sqrt(alpha_step) * beta_prev / beta_t) * z
            var = jnp.maximum(beta_prev / beta_t * (1 - alpha_step), 1e-20)
            std = jnp.where(t > 0, jnp.exp(0.5 * jnp.log(var)) if schedule.variance_type == "fixed_small_log"
                            else jnp.sqrt(var), 0.0)
        elif config.method == "ddim":
            if schedule.clip_sample and config.use_clipped_model_output:
                eps = (z - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
            else:
                eps = predict_eps(out, z, a_t, ptype)
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = config.eta * jnp.sqrt(var) if config.eta > 0 else None
            mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - (std**2 if std is not None else 0.0)) * eps
        else:
            mean = _dpmpp_2m_update(z, x0, prev_x0, xs)
        if grad is not None:
            mean = mean - g * grad
        z_prev = mean if std is None else mean + std * step_noise(key, i, z.shape, z.dtype)
        z_prev = z_prev.astype(z.dtype)
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return (z_prev, x0.astype(z.dtype)), ((z_prev, x0) if config.return_trajectory else None)

    @jax.jit
    def sampler(key, z_T, cond, uncond=None, aux=None, x0_init=None, params=None) -> SampleOutput:
        if config.cfg_scale != 1.0 and uncond is None:
            raise ValueError("SamplerConfig.cfg_scale != 1 needs an uncond (negative or null) condition")
        z = z_T
        if config.strength < 1.0:
            if x0_init is None:
                raise ValueError("SamplerConfig.strength < 1 needs x0_init (the latents to start from)")
            z = q_sample(x0_init, step_noise(key, -1, x0_init.shape, x0_init.dtype), tables["a_t"][0])
        (z, _), trajectories = jax.lax.scan(lambda c, xs: step(c, xs, params, key, cond, uncond, aux),
                                            (z, jnp.zeros_like(z)), tables)
        return SampleOutput(z, *(trajectories or (None, None)))

    return sampler
