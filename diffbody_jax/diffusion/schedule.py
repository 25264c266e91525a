"""Noise schedules of discrete-time diffusion, identical to diffusers' schedulers, as jittable arrays.

`NoiseSchedule` is the config (diffusers' scheduler_config.json field names); `NoiseSchedule.arrays()` gives the
float32 alphas_cumprod that samplers and losses index with integer timesteps. Betas are computed on the host
with numpy in the same float32 arithmetic as PyTorch, so alphas_cumprod equals diffusers' bit for bit. The one
exception is the zero-terminal-SNR rescale: PyTorch's float32 sqrt is not correctly rounded, and numpy's is.
The difference is at most 4e-7 absolute.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffbody_jax.config import dataclass_from_dict

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
VARIANCES = ("fixed_small", "fixed_small_log")

# scheduler_config.json fields that do not change the noise process nor any of our samplers' arithmetic, at
# any value: other schedulers' options (PNDM, Euler), and options that act only when a feature we refuse is on
# (thresholding, dynamic shifting, flow sigmas). Accepted and listed in a debug log.
_MATH_NEUTRAL = (
    "skip_prk_steps", "interpolation_type", "timestep_type", "sigma_min", "sigma_max", "dynamic_thresholding_ratio",
    "sample_max_value", "time_shift_type", "flow_shift", "shift_terminal", "base_shift", "max_shift",
    "base_image_seq_len", "max_image_seq_len",
)
# Fields that would change the math: accepted only at the value our samplers implement (DPM-Solver++(2M) as
# DPMSolverMultistepScheduler's defaults), refused by name otherwise.
_FEATURE_OFF = {
    "trained_betas": (None,), "thresholding": (False,),
    "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
    "lower_order_final": (True,), "euler_at_final": (False,), "final_sigmas_type": ("zero",),
    "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,), "use_lu_lambdas": (False,), "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-math.inf,),
}


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) on the CPU, reproduced bit for bit.

    PyTorch rounds start, end and the step to float32, fills the first half from start and the second
    from end, and its vectorised kernel fuses the multiply-add (one rounding). np.linspace differs in
    the last bit for 10-20% of the values, which is enough to change alphas_cumprod.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    # float32 x float32 products are exact in float64, so this rounds once, as the fused multiply-add does.
    low = np.float64(start32) + step * idx
    high = np.float64(end32) - step * (steps - idx - 1)
    return np.where(idx < steps // 2, low, high).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # PyTorch's CPU cumprod accumulates float32 in float64 (its acc_type) and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _squaredcos_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has SNR 0 (Lin et al. 2024), in float32."""
    sqrt_bar = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_bar[0].copy(), sqrt_bar[-1].copy()
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A diffusers scheduler config: betas, prediction type, timestep spacing. Defaults: SD2.1's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False  # clip the x0 estimate to +-clip_sample_range (DDPM, DDIM)
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"  # DDPM: fixed_small | fixed_small_log
    set_alpha_to_one: bool = False  # DDIM: alpha_bar after the last step is 1 (else alphas_cumprod[0])

    def __post_init__(self):
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("timestep_spacing", SPACINGS),
                              ("prediction_type", PREDICTIONS), ("variance_type", VARIANCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"NoiseSchedule: {name}={getattr(self, name)!r}; supported: {allowed}")

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "scheduler_config") -> NoiseSchedule:
        """From a diffusers scheduler_config.json dict: DDPM, DDIM, DPMSolverMultistep (what diffusers writes for
        them, any version we test), and the noise process of other schedulers (PNDM, Euler).

        Fields that cannot change the math are accepted and logged at debug level; a field that would change it
        and that we do not implement (Karras sigmas, solver order 3, thresholding, ...) is refused by name.
        DPM-Solver's `variance_type: null` (no learned variance) is our default variance.
        """
        config = dict(config)
        if "variance_type" in config and config["variance_type"] is None:
            del config["variance_type"]
        neutral = sorted(k for k in config if k in _MATH_NEUTRAL)
        if neutral:
            log.debug("%s: accepted fields that do not change the noise process or the samplers: %s", source,
                      ", ".join(f"{k}={config[k]!r}" for k in neutral))
        try:
            return dataclass_from_dict(cls, config, kind="scheduler", source=source, feature_off=_FEATURE_OFF,
                                       ignored=_MATH_NEUTRAL)
        except ValueError as e:  # a value refused by __post_init__: name the file too
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: {e}") from None

    def arrays(self) -> dict[str, jnp.ndarray]:
        """{"alphas_cumprod": [T] float32} as a device array, for jitted samplers and losses."""
        return {"alphas_cumprod": jnp.asarray(self.alphas_cumprod())}

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch_linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:
            betas = _squaredcos_betas(n)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float32, equal to diffusers' `scheduler.alphas_cumprod`."""
        return _cumprod_f32(np.float32(1) - self.betas())

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int32 timesteps of a sampler with `num_inference_steps`, as diffusers' `set_timesteps`."""
        n = self.num_train_timesteps
        if not 0 < num_inference_steps <= n:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in 1..{n}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, num_inference_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(num_inference_steps) * (n // num_inference_steps)).round()[::-1] + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / num_inference_steps)) - 1
        return ts.astype(np.int32)


# ------------------------------------------------------------------------------- prediction algebra
# With a_t = alphas_cumprod[t]: z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and v = sqrt(a_t) eps - sqrt(1 - a_t) x0.
# `alpha_bar` broadcasts against the latents ([B, 1, 1, 1] or a scalar).


def predict_x0(model_output, z_t, alpha_bar, prediction_type: str):
    """x0 from an eps, v or x0 prediction."""
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (z_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * z_t - s * model_output
    return model_output


def predict_eps(model_output, z_t, alpha_bar, prediction_type: str):
    """eps from an eps, v or x0 prediction."""
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a * model_output + s * z_t
    return (z_t - a * model_output) / s


def velocity(x0, eps, alpha_bar):
    """The v-prediction target sqrt(a) eps - sqrt(1 - a) x0."""
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1 - alpha_bar) * x0


def q_sample(x0, eps, alpha_bar):
    """Noise x0 to z_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * eps
