"""The weights folder `diffbody restore --weights DIR` reads: one subfolder per component, each as `diffbody convert`
or a training phase's export writes it.

    DIR/
      swinir/              SwinIR, stage 0 (a `swinir` run's export/, or `convert swinir-to-flax`'s output)
      bodypart/            the part network (v1's attention map and part-loss guidance)
      sd21/                Stable Diffusion 2.1-base: a diffusers pipeline folder or `convert to-flax`'s checkpoint
                           (unet, vae, text_encoder; tokenizer/ optional, CLIP's is built offline when absent)
      v1_controlnet/       v1's latent-condition ControlNet (a v1_controlnet run's export/)
      joint_unet/          v2 stage 1's joint UNet (a stage1_joint_unet run's export/)
      stage1_controlnet/   v2 stage 1's ControlNet (a stage1_controlnet run's export/)
      sdxl/                SDXL-base: a diffusers pipeline folder or our checkpoint (unet, vae, text_encoder,
                           text_encoder_2; tokenizer/, tokenizer_2/ optional)
      stage2_controlnet/   v2 stage 2's prior-fusion ControlNet (a stage2_controlnet run's export/)
      colour_adapter/      the colour adapter in IP-Adapter-Plus-XL's layout (a colour_adapter run's export/, or
                           `convert ip-adapter-to-flax`)
      image_encoder/       the adapter's CLIP vision tower (IP-Adapter's sdxl_models/image_encoder)

Each trained component's folder holds its run's contract.json (`diffusion.contract`: schedule and prediction type,
latent statistics, I_attn source, part loss, pose style, adapter and text settings); `restore_contracts` reads one per
stage, falls back to the base pipeline's scheduler for a component without one (saying so), and refuses components
restored together that disagree, naming both files.

`check_weights(DIR)` reports each component (present, readable, its class and parameter count, or the problem)
and what each version still needs; `load_v1_models` / `load_v2_models` build the pipelines' model groups.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.config import CONFIG_DIR
from diffbody_jax.diffusion.contract import (
    BASE_PIPELINE,
    PHASE_COMPONENTS,
    Contract,
    default_contract,
    disagreements,
    read_contract,
)
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json
from diffbody_jax.interop import flax_checkpoint
from diffbody_jax.interop.pretrained import family_for_module, load_pretrained, save_pretrained
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.stacked_blocks import to_model_layout
from diffbody_jax.models.stage2 import Stage2Model, stage2_params


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # "swinir", or "<pipeline>/<component>" inside a pipeline folder
    what: str
    source: str  # how a user gets it

    @property
    def folder(self) -> str:
        return self.name.split("/")[0]

    @property
    def subfolder(self) -> str | None:
        return self.name.split("/")[1] if "/" in self.name else None


_SD21 = "the SD2.1-base pipeline folder, or `diffbody convert to-flax --src it --dst DIR/sd21`"
_SDXL = "the SDXL-base pipeline folder, or `diffbody convert to-flax --src it --dst DIR/sdxl`"
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("swinir", "SwinIR (stage 0)",
              "`diffbody train --config swinir` (its export/) or `convert swinir-to-flax`"),
    Component("bodypart", "body-part network", "`diffbody convert bodypart-to-flax` of a BPBreID checkpoint"),
    Component("sd21/unet", "SD2.1 UNet", _SD21),
    Component("sd21/vae", "SD2.1 VAE", _SD21),
    Component("sd21/text_encoder", "SD2.1 text encoder", _SD21),
    Component("v1_controlnet", "v1 latent-condition ControlNet", "`diffbody train --config v1_controlnet` (export/)"),
    Component("joint_unet", "v2 stage-1 joint UNet", "`diffbody train --config stage1_joint_unet` (export/)"),
    Component("stage1_controlnet", "v2 stage-1 ControlNet", "`diffbody train --config stage1_controlnet` (export/)"),
    Component("sdxl/unet", "SDXL UNet", _SDXL),
    Component("sdxl/vae", "SDXL VAE", _SDXL),
    Component("sdxl/text_encoder", "SDXL text encoder", _SDXL),
    Component("sdxl/text_encoder_2", "SDXL text encoder 2", _SDXL),
    Component("stage2_controlnet", "v2 stage-2 prior-fusion ControlNet",
              "`diffbody train --config stage2_controlnet` (export/)"),
    Component("colour_adapter", "v2 colour adapter", "`diffbody train --config colour_adapter` (export/) or "
              "`convert ip-adapter-to-flax` of ip-adapter-plus_sdxl_vit-h.bin"),
    Component("image_encoder", "colour adapter's CLIP vision tower", "IP-Adapter's sdxl_models/image_encoder folder"),
)}
NEEDS: dict[str, tuple[str, ...]] = {
    "v1": ("swinir", "sd21/unet", "sd21/vae", "sd21/text_encoder", "v1_controlnet"),
    "v2": ("swinir", "sd21/vae", "sd21/text_encoder", "joint_unet", "stage1_controlnet", "sdxl/unet", "sdxl/vae",
           "sdxl/text_encoder", "sdxl/text_encoder_2", "stage2_controlnet", "colour_adapter", "image_encoder"),
}
# used when present: without bodypart, v1's I_attn is an annotator's person mask (an approximation) and part-loss
# guidance is off
OPTIONAL: dict[str, tuple[str, ...]] = {"v1": ("bodypart",), "v2": ()}
# the components whose spatial self-attention grows with the image (the attention_backend they are built with)
ATTENTION_COMPONENTS = ("sd21/unet", "sd21/vae", "v1_controlnet", "joint_unet", "stage1_controlnet", "sdxl/unet",
                        "sdxl/vae", "stage2_controlnet")
# the components of part-loss guidance's backward pass (UNet, ControlNet, VAE decode) that rematerialise their blocks
# when built with remat=True (the Restorer asks for it with --guidance where `guidance_remat` says so)
REMAT_COMPONENTS = ("sd21/unet", "v1_controlnet", "sd21/vae")
GUIDANCE_REMAT_MEMBERS = ("unet", "controlnet", "vae")  # the same, as v1's model-group members (`plan_restore`)
# the UNet family: built with scan_layers=True, their deep transformer stacks compile as one scan each
SCAN_COMPONENTS = ("sd21/unet", "v1_controlnet", "joint_unet", "stage1_controlnet", "sdxl/unet", "stage2_controlnet")


def guidance_remat(platform: str) -> bool:
    """Whether part-loss guidance builds REMAT_COMPONENTS with remat on devices of `platform` (restore and its plan
    both ask here). On GPU and TPU, yes: the backward pass of each step then keeps block boundaries only. On XLA:CPU,
    no: it drops remat's optimisation barriers, so no memory is saved (at 1024x512 the guided program's temporaries
    are 19.8 GiB with it and 21.2 without), and the recomputation still costs time (ms per guided step without it
    and with UNet + ControlNet + VAE remat: tiny v1 at 64 px 174 and 264, mid at 256 px 1092 and 1644;
    bench/guidance_step.py, docs/performance.md)."""
    return platform != "cpu"


# Restoring in bfloat16 (`RestoreSettings.dtype`): the VAEs stay float32, weights and compute (their decode is the
# output image; docs/scaling.md, "Precision"), named as model-group members and as weights components
FLOAT32_MEMBERS = ("vae",)
FLOAT32_COMPONENTS = ("sd21/vae", "sdxl/vae")
DTYPES = ("float32", "bfloat16")


# the members each of v2's offloaded programs reads besides a whole stage (`Restorer._on_devices`, `plan_restore`)
TEXT_MEMBERS = ("text_encoder", "text_encoder_2")


def members_of(variables: dict, names) -> dict:
    """v2's {stage: {collection: {member: tree}}} variables cut to the members in `names`, in every stage."""
    return {stage: {collection: {m: t for m, t in by_member.items() if m in names}
                    for collection, by_member in stage_tree.items()} for stage, stage_tree in variables.items()}


def dtype_kwargs(name: str, dtype: str) -> dict:
    """Module keyword arguments that give component or group member `name` ("sd21/unet", "vae") weights and compute
    in `dtype` (float32 for the VAEs)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {DTYPES}")
    if dtype == "float32" or name.split("/")[-1] in FLOAT32_MEMBERS:
        return {}
    return {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype)}


# CLIP tokenizers: (folder inside DIR, pad token when built offline)
TOKENIZERS = {"sd21": ("sd21/tokenizer", "!"), "sdxl": ("sdxl/tokenizer", "<|endoftext|>"),
              "sdxl_2": ("sdxl/tokenizer_2", "!")}
DEFAULT_SCHEDULERS = {"sd21": CONFIG_DIR / "diffusers/sd21-base/scheduler/scheduler_config.json",
                      "sdxl": CONFIG_DIR / "diffusers/sdxl-base/scheduler/scheduler_config.json"}


class WeightsError(ValueError):
    """A missing or unusable component; the message names the folder and the problem."""


def component_location(weights: str | os.PathLike, name: str) -> tuple[Path, str | None]:
    """(path, subfolder) that `load_pretrained` reads for component `name` of the weights folder."""
    c = COMPONENTS[name]
    return Path(weights) / c.folder, c.subfolder


def component_folder(weights: str | os.PathLike, name: str) -> Path:
    """The folder holding component `name` in the diffusers layout (its config.json and tensors)."""
    path, sub = component_location(weights, name)
    return path / sub if sub else path


def component_present(weights: str | os.PathLike, name: str) -> bool:
    path, sub = component_location(weights, name)
    if flax_checkpoint.is_flax_checkpoint(path):
        return sub is None or sub in flax_checkpoint.read_config(path)["components"]
    return component_folder(weights, name).joinpath("config.json").exists()


def load_component(weights: str | os.PathLike, name: str, dtype: str = "float32", **module_kwargs
                   ) -> tuple[Any, dict]:
    """(module, variables {"params"[, "batch_stats"]}) of one component; WeightsError naming it when missing or
    misshapen (load_pretrained checks every tensor against the module its config.json describes).
    dtype: float32 | bfloat16, weights and compute (`dtype_kwargs`: the VAEs stay float32)."""
    path, sub = component_location(weights, name)
    where = component_folder(weights, name)
    if not component_present(weights, name):
        raise WeightsError(f"{where}: missing ({COMPONENTS[name].what}; get it from {COMPONENTS[name].source})")
    if name.endswith("vae") and module_kwargs.get("attention_backend", "bounded") == "bounded":
        # the VAE's mid-block attention spans a whole (tile's) latent: a 2 GiB matrix for a 256-pixel tile of the
        # tiny preset's 1/2 latents, in one head of 512 (too wide for cuDNN); "chunked" is the same math in blocks of
        # 1024 queries, each rematerialised in a backward pass (part-loss guidance's)
        module_kwargs = {**module_kwargs, "attention_backend": "chunked"}
    if name not in ATTENTION_COMPONENTS:
        module_kwargs = {k: v for k, v in module_kwargs.items() if k != "attention_backend"}
    if name not in REMAT_COMPONENTS:
        module_kwargs = {k: v for k, v in module_kwargs.items() if k != "remat"}
    if name not in SCAN_COMPONENTS:
        module_kwargs = {k: v for k, v in module_kwargs.items() if k != "scan_layers"}
    module_kwargs = {**module_kwargs, **dtype_kwargs(name, dtype)}
    try:
        module, loaded = load_pretrained(path, subfolder=sub, **module_kwargs)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise WeightsError(f"{where}: {e}") from e
    # families with state besides params (BatchNorm statistics) load as their whole variables dict
    return module, (dict(loaded) if family_for_module(module).variables else {"params": loaded})


def write_component(weights: str | os.PathLike, name: str, module, variables: dict) -> Path:
    """Write one component where `load_component` reads it (the demo's stand-in weights use this)."""
    params = variables if family_for_module(module).variables else variables["params"]
    return save_pretrained(component_folder(weights, name), module, jax.tree.map(np.asarray, params))


@dataclasses.dataclass
class ComponentReport:
    name: str
    present: bool
    problem: str | None = None
    class_name: str | None = None
    num_params: int = 0


def check_weights(weights: str | os.PathLike, load: bool = True) -> tuple[list[ComponentReport], dict[str, list]]:
    """Each component's state and, per version, the components it still needs (missing or broken).
    load: read every present component fully (shapes checked against its config); False checks configs only."""
    if not Path(weights).is_dir():
        raise WeightsError(f"{weights}: not a folder")
    reports = []
    for name in COMPONENTS:
        report = ComponentReport(name, component_present(weights, name))
        if report.present and load:
            try:
                module, variables = load_component(weights, name)
                report.class_name = type(module).__name__
                report.num_params = int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))
            except WeightsError as e:
                report.problem = str(e)
        reports.append(report)
    ok = {r.name for r in reports if r.present and r.problem is None}
    needs = {version: [n for n in names if n not in ok] for version, names in NEEDS.items()}
    return reports, needs


def require(weights: str | os.PathLike, version: str) -> None:
    """Raise one WeightsError listing every component `version` needs that is absent."""
    missing = [n for n in NEEDS[version] if not component_present(weights, n)]
    if missing:
        lines = [f"  {component_folder(weights, n)}: "
                 f"{COMPONENTS[n].what}; {COMPONENTS[n].source}" for n in missing]
        raise WeightsError(f"{weights}: {version} needs {len(missing)} more component(s):\n" + "\n".join(lines))


def scheduler_path(weights: str | os.PathLike, pipeline: str) -> Path:
    """The pipeline folder's scheduler/scheduler_config.json, else the one bundled in configs/diffusers."""
    path = Path(weights) / pipeline / "scheduler" / "scheduler_config.json"
    return path if path.exists() else DEFAULT_SCHEDULERS[pipeline]


def load_schedule(weights: str | os.PathLike, pipeline: str) -> NoiseSchedule:
    path = scheduler_path(weights, pipeline)
    return NoiseSchedule.from_dict(read_json(path), str(path))


def tokenizer_folder(weights: str | os.PathLike, which: str) -> tuple[str | None, str]:
    """(folder or None: build CLIP's offline, pad token) of tokenizer `which` (sd21, sdxl, sdxl_2)."""
    folder, pad = TOKENIZERS[which]
    path = Path(weights) / folder
    return (str(path) if path.is_dir() else None), pad


def _group(weights, names: Sequence[tuple[str, str]], **module_kwargs) -> tuple[ModelGroup, dict]:
    members, variables = {}, {}
    for member, component in names:
        module, loaded = load_component(weights, component, **module_kwargs)  # attention_backend where it applies
        members[member] = module
        for collection, tree in loaded.items():
            variables.setdefault(collection, {})[member] = tree
    return ModelGroup(**members), variables


def load_v1_models(weights: str | os.PathLike, **module_kwargs) -> tuple[ModelGroup, dict]:
    """The v1 pipeline's group (unet, controlnet, vae, swinir, text_encoder, and bodypart when the folder has it)
    and its variables."""
    require(weights, "v1")
    names = [("unet", "sd21/unet"), ("controlnet", "v1_controlnet"), ("vae", "sd21/vae"), ("swinir", "swinir"),
             ("text_encoder", "sd21/text_encoder")]
    if component_present(weights, "bodypart"):
        names.append(("bodypart", "bodypart"))
    return _group(weights, names, **module_kwargs)


def load_v2_models(weights: str | os.PathLike, **module_kwargs) -> tuple[ModelGroup, ModelGroup, dict]:
    """v2's two groups and their variables {"stage1": ..., "stage2": ...}:
    stage 1 (swinir, vae, joint_unet, controlnet, text_encoder) and stage 2 (stage2 = SDXL UNet with the adapter's
    key/values + prior-fusion ControlNet + Resampler, vae, image_encoder, text_encoder, text_encoder_2)."""
    require(weights, "v2")
    stage1, v1 = _group(weights, [("swinir", "swinir"), ("vae", "sd21/vae"), ("joint_unet", "joint_unet"),
                                  ("controlnet", "stage1_controlnet"), ("text_encoder", "sd21/text_encoder")],
                        **module_kwargs)
    rest, v2 = _group(weights, [("vae", "sdxl/vae"), ("image_encoder", "image_encoder"),
                                ("text_encoder", "sdxl/text_encoder"), ("text_encoder_2", "sdxl/text_encoder_2")],
                      **module_kwargs)
    # the UNet and ControlNet are read in the file layout: the adapter's key/values join the UNet's blocks there,
    # and the assembled params are stacked once below where the model scans
    scan_layers = bool(module_kwargs.pop("scan_layers", False))
    unet, unet_vars = load_component(weights, "sdxl/unet", **module_kwargs)
    controlnet, cn_vars = load_component(weights, "stage2_controlnet", **module_kwargs)
    adapter, adapter_vars = load_component(weights, "colour_adapter", **module_kwargs)
    if adapter.config.unet.cross_attention_dim != unet.config.cross_attention_dim:
        raise WeightsError(f"{Path(weights) / 'colour_adapter'}: made for a UNet with cross_attention_dim "
                           f"{adapter.config.unet.cross_attention_dim}; sdxl/unet has "
                           f"{unet.config.cross_attention_dim}")
    model = Stage2Model(unet.clone(ip_adapter=True, scan_layers=scan_layers),
                        controlnet.clone(scan_layers=scan_layers), adapter.resampler)
    v2["params"]["stage2"] = to_model_layout(model, stage2_params(unet_vars["params"], cn_vars["params"],
                                                                  adapter_vars["params"]))
    stage2 = ModelGroup(stage2=model, **rest.members)
    return stage1, stage2, {"stage1": v1, "stage2": v2}


# ------------------------------------------------------------------------------------------ contracts
# the diffusion components each stage of a version is restored with; the first one's contract is the stage's
STAGE_COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "v1": {"v1": ("v1_controlnet",)},
    "v2": {"stage1": ("stage1_controlnet", "joint_unet"), "stage2": ("stage2_controlnet", "colour_adapter")},
}
TRAINED_COMPONENTS = tuple(PHASE_COMPONENTS.values())


def component_contract(weights: str | os.PathLike, name: str) -> Contract | None:
    """The contract.json a training run exported beside component `name`, or None."""
    path, sub = component_location(weights, name)
    try:
        return read_contract(path / sub if sub else path)
    except ValueError as e:
        raise WeightsError(str(e)) from e


def restore_contracts(weights: str | os.PathLike, version: str) -> tuple[dict[str, Contract], list[str]]:
    """({stage: contract}, notes) for `version`: per stage, the contract of its first component that has one
    (every other one of the stage must agree on schedule, latent statistics and pose style, else WeightsError
    naming both files); a stage whose components have none gets `default_contract` and a note."""
    out, notes = {}, []
    for stage, names in STAGE_COMPONENTS[version].items():
        found = [(n, c) for n in names if (c := component_contract(weights, n)) is not None]
        for (_, a), (_, b) in zip(found, found[1:], strict=False):
            problems = disagreements(a, b)
            if problems:
                raise WeightsError(f"{weights}: {stage} components were trained apart and disagree:\n  "
                                   + "\n  ".join(problems))
        if found:
            out[stage] = found[0][1]
            for n in names:
                if n not in dict(found):
                    notes.append(f"{n}: no contract.json; restored with {found[0][1].source}'s")
        else:
            out[stage] = default_contract(names[0], read_json(scheduler_path(weights, BASE_PIPELINE[names[0]])),
                                          component_present(weights, "bodypart"))
            notes.append(f"{'/'.join(names)}: no contract.json (converted weights); restored with the "
                         f"{BASE_PIPELINE[names[0]]} pipeline's scheduler and the default pose style")
    stages = [c for c in out.values() if not c.is_default]
    for a, b in zip(stages, stages[1:], strict=False):
        problems = disagreements(a, b, ("pose_style",))
        if problems:
            raise WeightsError(f"{weights}: the stages were trained with different pose maps (one pose map feeds "
                               "both):\n  " + "\n  ".join(problems))
    return out, notes
