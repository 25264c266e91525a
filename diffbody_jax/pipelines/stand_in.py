"""A complete weights folder of tiny stand-in models: what `diffbody demo` and the tests restore with when no real
weights can be downloaded. Every component has the tiny training configs' architecture (configs/v1_controlnet.py,
stage1_controlnet.py and colour_adapter.py at variant=tiny) and random weights (`models.variables.random_variables`);
a trained component (the demo's SwinIR) can be put in its place afterwards.

    write_stand_in_weights("demo/weights")      # every component of weights.COMPONENTS, and CLIP's tokenizers
"""

from __future__ import annotations

import os
from pathlib import Path

from diffbody_jax.conditioning.prompts import open_clip_bpe_path, write_clip_tokenizer_files
from diffbody_jax.config import load_config
from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig
from diffbody_jax.models.ip_adapter import ip_adapter_of, without_ip_adapter
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.weights import TOKENIZERS, write_component

# (phase config, member) -> component of the weights folder
_MEMBERS = {
    ("v1_controlnet", "swinir"): "swinir",
    ("v1_controlnet", "bodypart"): "bodypart",
    ("v1_controlnet", "unet"): "sd21/unet",
    ("v1_controlnet", "vae"): "sd21/vae",
    ("v1_controlnet", "text_encoder"): "sd21/text_encoder",
    ("v1_controlnet", "controlnet"): "v1_controlnet",
    ("stage1_controlnet", "joint_unet"): "joint_unet",
    ("stage1_controlnet", "controlnet"): "stage1_controlnet",
    ("colour_adapter", "vae"): "sdxl/vae",
    ("colour_adapter", "text_encoder"): "sdxl/text_encoder",
    ("colour_adapter", "text_encoder_2"): "sdxl/text_encoder_2",
    ("colour_adapter", "image_encoder"): "image_encoder",
}


def write_stand_in_weights(weights: str | os.PathLike, seed: int = 0, skip: tuple[str, ...] = (),
                           v1_variant: str = "tiny", versions: tuple[str, ...] = ("v1", "v2")) -> Path:
    """Write the tiny stand-in of every component (except those in `skip`) and CLIP's tokenizer files under
    `weights`. The stand-ins of v1 and v2 stage 1 share the SD2.1 VAE and text encoder, as the real models do.
    v1_variant: configs/v1_controlnet.py's variant of v1's members ("mid": the benchmark's mid-size preset, whose
    VAE and text encoder then do not fit v2: pass versions=("v1",))."""
    weights = Path(weights)
    phases = (("v1_controlnet", v1_variant),) * ("v1" in versions) + (
        (("stage1_controlnet", "tiny"), ("colour_adapter", "tiny")) if "v2" in versions else ())
    for n, (phase, variant) in enumerate(phases):
        group = build_model(load_config(f"{phase}:variant={variant}").model)
        for m, (member, module) in enumerate(group.members.items()):
            component = _MEMBERS.get((phase, member))
            if member == "stage2" and not {"sdxl/unet", "stage2_controlnet", "colour_adapter"} <= set(skip):
                params = random_variables(module, seed + 100 * n + m)["params"]
                write_component(weights, "sdxl/unet", module.unet.clone(ip_adapter=False),
                                {"params": without_ip_adapter(params["unet"])})
                write_component(weights, "stage2_controlnet", module.controlnet, {"params": params["controlnet"]})
                adapter = ColourAdapter(ColourAdapterConfig(module.unet.config, module.image_proj.config))
                adapter_params = {"image_proj": params["image_proj"], "ip_adapter": ip_adapter_of(params["unet"])}
                write_component(weights, "colour_adapter", adapter, {"params": adapter_params})
            elif component is not None and component not in skip:
                write_component(weights, component, module, random_variables(module, seed + 100 * n + m))
    for folder, pad in TOKENIZERS.values():
        write_clip_tokenizer_files(weights / folder, open_clip_bpe_path(), pad)
    return weights
