"""Model builders by name: a config file's `model.name` picks the function that builds its Flax module.

    module = build_model(load_config("controlnet:variant=tiny-v1").model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from diffbody_jax.config import runtime_kwargs
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from diffbody_jax.models.controlnet import build_controlnet
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.joint_unet import build_joint_unet
from diffbody_jax.models.stage2 import build_stage2
from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
from diffbody_jax.models.unet import build_unet
from diffbody_jax.models.vae import AutoencoderKL, VAEConfig


def _swinir(model) -> SwinIR:
    return SwinIR(SwinIRConfig.from_dict(model["swinir"].to_dict(), "model.swinir"), **runtime_kwargs(model))


def _vae(model) -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_dict(dict(model["diffusers"]), "model.diffusers"),
                         dtype=jnp.dtype(model["dtype"]), param_dtype=jnp.dtype(model["param_dtype"]),
                         attention_backend=model["attention_backend"])


def _clip_text(model) -> CLIPTextModel:
    kw = runtime_kwargs(model)
    kw.pop("remat")
    return CLIPTextModel(CLIPTextConfig.from_dict(dict(model["transformers"]), "model.transformers"), **kw)


def _clip_vision(model) -> CLIPVisionModel:
    kw = runtime_kwargs(model)
    kw.pop("remat")
    return CLIPVisionModel(CLIPVisionConfig.from_dict(dict(model["transformers"]), "model.transformers"), **kw)


def _group(model) -> ModelGroup:
    """model.members: {name: a model section}, each built by its own `name` (a phase's modules as one model)."""
    return ModelGroup(**{name: build_model(section) for name, section in model["members"].items()})


def _bodypart(model) -> BodyPartNet:
    return BodyPartNet(config=BodyPartConfig.from_dict(model["bodypart"].to_dict(), "model.bodypart"))


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "unet": build_unet,
    "controlnet": build_controlnet,
    "joint_unet": build_joint_unet,
    "stage2": build_stage2,
    "swinir": _swinir,
    "vae": _vae,
    "bodypart": _bodypart,
    "clip_text": _clip_text,
    "clip_vision": _clip_vision,
    "group": _group,
}


def build_model(model_config):
    """The Flax module of a config file's `model` section, by its `name`."""
    name = model_config.get("name")
    if name not in BUILDERS:
        raise ValueError(f"model.name={name!r}: no builder; known: {sorted(BUILDERS)}")
    return BUILDERS[name](model_config)
