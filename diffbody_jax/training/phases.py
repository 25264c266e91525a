"""Training phases: what each one builds, trains and minimises, as data the training engine reads.

A `Phase` is
  build(model_config) -> module       the Flax module of a config's `model` section (`models.registry`),
  subset                              the trainable params (a `TrainableSubset`; the rest is frozen),
  loss(module, **switches) -> fn      a loss factory that resolves its switches (phase, prediction type,
                                      min-SNR, ...) once and returns fn(params, batch, key) -> (loss, metrics),
  prepare(frozen_params, batch)       the grain batch -> the loss's batch (encoders that run outside the
                                      trained model go here; identity where the batch already fits).

The DiffBody phases registered here so far: stage 0 (SwinIR, L2) and stage 2's two (Eq. 3, Eq. 4). The v1 and
v2 stage-1 phases follow with the training programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from diffbody_jax.models.registry import build_model
from diffbody_jax.models.swinir import SwinIR
from diffbody_jax.training.losses import STAGE2_PHASES, stage2_loss, swinir_l2_loss
from diffbody_jax.training.trainable import TrainableSubset

STAGE2_SUBSETS = {
    "controlnet": TrainableSubset("controlnet", (r"^controlnet/",)),
    "colour_adapter": TrainableSubset("colour_adapter", (r"^image_proj/", r"^unet/.*/to_[kv]_ip/")),
}


def _identity(frozen_params: Mapping, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    del frozen_params
    return batch


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    build: Callable[[Any], Any]
    subset: TrainableSubset
    loss: Callable[..., Callable]
    prepare: Callable[[Mapping, Mapping[str, Any]], Mapping[str, Any]] = _identity


def _swinir_loss(module: SwinIR):
    def fn(params, batch, key):
        loss = swinir_l2_loss(module, params, batch["degraded"], batch["target"], rng=key)
        return loss, {"loss": loss}

    return fn


def _stage2_loss(module, *, phase: str, alphas_cumprod, prediction_type: str = "epsilon", noise_offset: float = 0.0,
                 min_snr_gamma: float | None = None):
    kw = dict(prediction_type=prediction_type, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma)
    return lambda params, batch, key: stage2_loss(module, params, batch, key, alphas_cumprod, phase, **kw)


PHASES: dict[str, Phase] = {
    "swinir": Phase("swinir", build_model, TrainableSubset("swinir", (r".",)), _swinir_loss),
    **{f"stage2_{p}": Phase(f"stage2_{p}", build_model, STAGE2_SUBSETS[p], functools.partial(_stage2_loss, phase=p))
       for p in STAGE2_PHASES},
}


def get_phase(name: str) -> Phase:
    if name not in PHASES:
        raise ValueError(f"unknown training phase {name!r}; known: {sorted(PHASES)}")
    return PHASES[name]
