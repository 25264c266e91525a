"""Training phases: what each one builds, trains and minimises, as data the training engine reads.

A `Phase` is
  build(model_config) -> module       the Flax module of a config's `model` section (`models.registry`),
  subset                              the trainable params (a `TrainableSubset`; the rest is frozen),
  inputs                              the batch fields its loss reads (taken from the data pipeline's batches),
  switches(config) -> dict            the loss's settings read from the config (prediction type, min-SNR, ...),
  loss(module, **switches) -> fn      a loss factory: fn(variables, batch, key) -> (loss, metrics), `variables`
                                      = {"params": trainable + frozen, other collections},
  prepare(variables, batch)           the pipeline's batch -> the loss's batch, inside the jitted step (encoders
                                      that run outside the trained model go here; identity where it fits),
  export                              the param subtree written to the PyTorch layout at the end ("" = all).

The engine (`training.engine`) knows nothing else about a phase, so a new phase is a `Phase` registered here plus a
config file. Registered so far: stage 0 (SwinIR, L2) and stage 2's two (Eq. 3, Eq. 4).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from diffbody_jax.config import CONFIG_DIR
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.swinir import SwinIR
from diffbody_jax.training.losses import STAGE2_PHASES, stage2_loss, swinir_l2_loss
from diffbody_jax.training.trainable import TrainableSubset

STAGE2_SUBSETS = {
    "controlnet": TrainableSubset("controlnet", (r"^controlnet/",)),
    "colour_adapter": TrainableSubset("colour_adapter", (r"^image_proj/", r"^unet/.*/to_[kv]_ip/")),
}
STAGE2_INPUTS = ("latents", "prompt_embeds", "text_embeds", "time_ids", "priors")


def _identity(variables: Mapping, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    del variables
    return batch


def _no_switches(config) -> dict:
    del config
    return {}


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    build: Callable[[Any], Any]
    subset: TrainableSubset
    inputs: tuple[str, ...]
    loss: Callable[..., Callable]
    switches: Callable[[Any], dict] = _no_switches
    prepare: Callable[[Mapping, Mapping[str, Any]], Mapping[str, Any]] = _identity
    export: str = ""

    def loss_fn(self, module, config) -> Callable:
        """fn(variables, batch, key) -> (loss, metrics) of this phase for `module` under `config`."""
        loss = self.loss(module, **self.switches(config))
        return lambda variables, batch, key: loss(variables, self.prepare(variables, batch), key)


def _swinir_loss(module: SwinIR):
    def fn(variables, batch, key):
        loss = swinir_l2_loss(module, variables["params"], batch["degraded"], batch["target"], rng=key)
        return loss, {}

    return fn


def _stage2_switches(config) -> dict:
    scheduler = read_json(CONFIG_DIR / "diffusers" / "sdxl-base" / "scheduler" / "scheduler_config.json")
    diffusion = config["diffusion"]
    return dict(alphas_cumprod=NoiseSchedule.from_dict(scheduler).alphas_cumprod(),
                prediction_type=diffusion["prediction_type"], noise_offset=float(diffusion["noise_offset"]),
                min_snr_gamma=diffusion["min_snr_gamma"])


def _stage2_loss(module, *, phase: str, alphas_cumprod, prediction_type: str = "epsilon", noise_offset: float = 0.0,
                 min_snr_gamma: float | None = None):
    kw = dict(prediction_type=prediction_type, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma)
    return lambda variables, batch, key: stage2_loss(module, variables["params"], batch, key, alphas_cumprod, phase,
                                                     **kw)


PHASES: dict[str, Phase] = {
    "swinir": Phase("swinir", build_model, TrainableSubset("swinir", (r".",)), ("degraded", "target"), _swinir_loss),
    **{f"stage2_{p}": Phase(f"stage2_{p}", build_model, STAGE2_SUBSETS[p], STAGE2_INPUTS,
                            functools.partial(_stage2_loss, phase=p), _stage2_switches,
                            export="controlnet" if p == "controlnet" else "")
       for p in STAGE2_PHASES},
}


def get_phase(name: str) -> Phase:
    if name not in PHASES:
        raise ValueError(f"unknown training phase {name!r}; known: {sorted(PHASES)}")
    return PHASES[name]
