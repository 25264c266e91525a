"""A complete weights folder of tiny stand-in models: what `diffbody demo` and the tests restore with when no real
weights can be downloaded. Every component has the tiny training configs' architecture (configs/v1_controlnet.py,
stage1_controlnet.py and colour_adapter.py at variant=tiny) and random weights (`models.variables.random_variables`);
a trained component (the demo's SwinIR) can be put in its place afterwards. Each diffusion component gets the
contract.json its tiny phase would export (`diffusion.contract`), as if our engine had trained it; `contracts=False`
leaves them out (a converted folder).

    write_stand_in_weights("demo/weights")      # every component of weights.COMPONENTS, and CLIP's tokenizers
"""

from __future__ import annotations

import os
from pathlib import Path

from diffbody_jax.conditioning.prompts import open_clip_bpe_path, write_clip_tokenizer_files
from diffbody_jax.config import load_config
from diffbody_jax.diffusion.contract import MEMBER_COMPONENTS, PHASE_COMPONENTS, contract_from_config
from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig
from diffbody_jax.models.ip_adapter import without_ip_adapter
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.stage2 import adapter_params
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.weights import TOKENIZERS, component_location, write_component


def write_stand_in_weights(weights: str | os.PathLike, seed: int = 0, skip: tuple[str, ...] = (),
                           v1_variant: str = "tiny", versions: tuple[str, ...] = ("v1", "v2"),
                           contracts: bool = True, overrides: dict[str, list[str]] | None = None) -> Path:
    """Write the tiny stand-in of every component (except those in `skip`) and CLIP's tokenizer files under
    `weights`. The stand-ins of v1 and v2 stage 1 share the SD2.1 VAE and text encoder, as the real models do.
    v1_variant: configs/v1_controlnet.py's variant of v1's members ("mid": the benchmark's mid-size preset, whose
    VAE and text encoder then do not fit v2: pass versions=("v1",)). overrides: {phase: config overrides} for the
    contracts (e.g. {"stage1_controlnet": ["joint.normalize_latents=True"]}); without bodypart, v1's contract says
    I_attn came from person masks."""
    weights = Path(weights)
    phases = (("v1_controlnet", v1_variant),) * ("v1" in versions) + (
        (("stage1_controlnet", "tiny"), ("colour_adapter", "tiny")) if "v2" in versions else ())
    overrides, written = overrides or {}, set()
    for n, (phase, variant) in enumerate(phases):
        config = load_config(f"{phase}:variant={variant}")
        group = build_model(config.model)
        for m, (member, module) in enumerate(group.members.items()):
            component = MEMBER_COMPONENTS.get((phase, member))
            if member == "stage2" and not {"sdxl/unet", "stage2_controlnet", "colour_adapter"} <= set(skip):
                params = random_variables(module, seed + 100 * n + m)["params"]
                write_component(weights, "sdxl/unet", module.unet.clone(ip_adapter=False),
                                {"params": without_ip_adapter(params["unet"])})
                write_component(weights, "stage2_controlnet", module.controlnet, {"params": params["controlnet"]})
                adapter = ColourAdapter(ColourAdapterConfig(module.unet.config, module.image_proj.config))
                write_component(weights, "colour_adapter", adapter, {"params": adapter_params(params)})
            elif component is not None and component not in {*skip, *written}:
                written.add(component)
                write_component(weights, component, module, random_variables(module, seed + 100 * n + m))
    if contracts:
        for phase, variant, parent in _contract_phases(phases):
            extra = ["diffusion.attention='mask'", "data.maps=['pose', 'mask']"] if (
                phase == "v1_controlnet" and "bodypart" in skip) else []
            config = load_config(f"{phase}:variant={variant}", [*extra, *overrides.get(parent, [])])
            if PHASE_COMPONENTS[phase] not in skip:
                path, sub = component_location(weights, PHASE_COMPONENTS[phase])
                contract_from_config(config).write(path / sub if sub else path)
    for folder, pad in TOKENIZERS.values():
        write_clip_tokenizer_files(weights / folder, open_clip_bpe_path(), pad)
    return weights


def _contract_phases(phases):
    """(phase, variant, phase whose overrides apply) of each diffusion export a stand-in folder holds."""
    for phase, variant in phases:
        yield phase, variant, phase
        if phase == "stage1_controlnet":  # trained against that joint UNet: the same overrides
            yield "stage1_joint_unet", variant, phase
        if phase == "colour_adapter":
            yield "stage2_controlnet", variant, phase
