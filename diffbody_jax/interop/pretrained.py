"""One-line loading and saving of diffusers-layout model folders.

    module, params = diffbody_jax.load_pretrained("stable-diffusion-2-1-base/unet")
    diffbody_jax.save_pretrained("out/unet", module, params)   # diffusers can load this folder

A model family is registered by its diffusers `_class_name`: how to build its config and module from
config.json, and which mapping table moves its weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffbody_jax import files
from diffbody_jax.interop import clip as tables
from diffbody_jax.interop import flax_checkpoint, torch_files
from diffbody_jax.interop.bodypart import bodypart_table
from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig, adapter_table, fuse_kv, split_kv
from diffbody_jax.interop.joint_unet import joint_unet_table
from diffbody_jax.interop.mapping import MappingTable, flax_to_torch, torch_to_flax
from diffbody_jax.interop.swinir import swinir_table
from diffbody_jax.interop.unet import controlnet_table, unet_table
from diffbody_jax.interop.vae import vae_table
from diffbody_jax.models import clip
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet
from diffbody_jax.models.controlnet import (
    ControlNetConfig,
    ControlNetModel,
    controlnet_from_joint_unet,
    controlnet_from_unet,
)
from diffbody_jax.models.ip_adapter import is_ip_kernel_path
from diffbody_jax.models.joint_unet import JointUNet, JointUNetConfig, joint_unet_from_unet
from diffbody_jax.models.stacked_blocks import scans_layers, to_model_layout, unstack_blocks
from diffbody_jax.models.stage2 import Stage2Model, adapter_paths, is_adapter_path
from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from diffbody_jax.models.vae import AutoencoderKL, VAEConfig


def _nothing(path: str) -> bool:
    return False


def _keep(member, flat: dict) -> tuple[dict, Callable[[str], bool]]:
    """A file that is exactly the member's model."""
    return flat, _nothing


def _adapter_fills(member, flat: dict) -> tuple[dict, Callable[[str], bool]]:
    """A colour adapter file in a Stage2Model: its Resampler and the UNet's to_k_ip / to_v_ip; the rest untouched."""
    if isinstance(member, Stage2Model):
        return adapter_paths(flat), lambda path: not is_adapter_path(path)
    return flat, _nothing


def _unet_fills(member, flat: dict) -> tuple[dict, Callable[[str], bool]]:
    """A plain UNet file in a UNet built with the colour adapter's kernels: those keep their fresh values."""
    if getattr(member, "ip_adapter", False) and not any(is_ip_kernel_path(k) for k in flat):
        return flat, is_ip_kernel_path
    return flat, _nothing


@dataclasses.dataclass(frozen=True)
class Family:
    """How one diffusers model class maps onto ours."""

    class_name: str
    config_from_dict: Callable[[dict, str], Any]  # (config.json dict, source name) -> our config
    build: Callable[..., Any]  # (config, **module_kwargs) -> Flax module
    table: Callable[[Any], MappingTable]  # config -> mapping table
    component: str  # its folder name in a diffusers pipeline, and its item name in our checkpoints
    weights_name: str = "diffusion_pytorch_model.safetensors"
    # the config.json to write: every config class's `to_dict()` gives it (diffusers' or transformers' format for
    # their models, ours otherwise); a family may add fields
    config_to_dict: Callable[[Any], dict] = lambda cfg: cfg.to_dict()  # noqa: E731
    # True for models with state besides params (BatchNorm statistics): the weights are then the whole
    # variables dict {"params", "batch_stats"}, and load_pretrained returns it in place of the params
    variables: bool = False
    # the family's PyTorch layout where it is not the table's own (IP-Adapter's fused to_kv): applied to a state
    # dict after reading (from_torch) and before writing (to_torch)
    from_torch: Callable[[dict, str], dict] = lambda sd, source: sd  # noqa: E731
    to_torch: Callable[[dict], dict] = lambda sd: sd  # noqa: E731
    # how this family's file fills a member that is more than the file's model: (member, flat params) -> (flat params
    # keyed by the member's paths, predicate true on the member's paths the file leaves as they are)
    fills: Callable[[Any, dict], tuple[dict, Callable[[str], bool]]] = _keep

    def shapes(self, module) -> dict:
        """What the family's files hold for `module`: its param (or variable) shapes in the file layout."""
        return unstack_blocks(module.variable_shapes() if self.variables else module.param_shapes())


def _diffusers_family(class_name: str, component: str) -> Callable[[], Family]:
    """UNet2DConditionModel, ControlNetModel and AutoencoderKL: diffusers configs, built lazily."""

    def make() -> Family:

        config_cls, module_cls, table = {
            "UNet2DConditionModel": (UNetConfig, UNet2DConditionModel, unet_table),
            "ControlNetModel": (ControlNetConfig, ControlNetModel, controlnet_table),
            "AutoencoderKL": (VAEConfig, AutoencoderKL, vae_table),
        }[class_name]
        return Family(
            class_name,
            lambda d, src: config_cls.from_dict(d, src),
            lambda cfg, **kw: module_cls(cfg, **kw),
            table,
            component,
            fills=_unet_fills if class_name == "UNet2DConditionModel" else _keep,
        )

    return make


def _clip_family(class_name: str) -> Callable[[], Family]:
    """CLIPTextModel, CLIPVisionModel and their WithProjection variants (the config carries which)."""

    def make() -> Family:

        vision = class_name.startswith("CLIPVision")
        config_cls = clip.CLIPVisionConfig if vision else clip.CLIPTextConfig
        module_cls = clip.CLIPVisionModel if vision else clip.CLIPTextModel
        return Family(
            class_name,
            lambda d, src: config_cls.from_dict(d, src),
            lambda cfg, **kw: module_cls(cfg, **kw),
            tables.clip_vision_table if vision else tables.clip_text_table,
            "image_encoder" if vision else "text_encoder",
            "model.safetensors",
        )

    return make


def _joint_unet_family() -> Family:

    return Family(
        "JointUNet", JointUNetConfig.from_dict, lambda cfg, **kw: JointUNet(cfg, **kw), joint_unet_table, "unet",
    )


def _ours(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _swinir_family() -> Family:
    return Family("SwinIR", lambda d, src: SwinIRConfig.from_dict(_ours(d), src), lambda cfg, **kw: SwinIR(cfg, **kw),
                  swinir_table, "swinir", "model.safetensors")


def _bodypart_family() -> Family:
    return Family(
        "BodyPartNet", lambda d, src: BodyPartConfig.from_dict(_ours(d), src),
        lambda cfg, **kw: BodyPartNet(config=cfg, **kw),
        lambda cfg: bodypart_table(BodyPartNet(config=cfg).variable_shapes()), "bodypart", "model.safetensors",
        lambda cfg: {"_class_name": "BodyPartNet", **cfg.to_dict()}, variables=True,
    )


def _colour_adapter_family() -> Family:
    return Family(
        "IPAdapterPlus", ColourAdapterConfig.from_dict,
        lambda cfg, **kw: ColourAdapter(cfg, tuple(sorted(kw.items()))),
        lambda cfg: adapter_table(cfg.unet, "original"), "colour_adapter", "ip_adapter.safetensors",
        from_torch=split_kv, to_torch=fuse_kv, fills=_adapter_fills,
    )


FAMILIES: dict[str, Callable[[], Family]] = {
    "IPAdapterPlus": _colour_adapter_family,
    "SwinIR": _swinir_family,
    "BodyPartNet": _bodypart_family,
    "JointUNet": _joint_unet_family,
    "UNet2DConditionModel": _diffusers_family("UNet2DConditionModel", "unet"),
    "ControlNetModel": _diffusers_family("ControlNetModel", "controlnet"),
    "AutoencoderKL": _diffusers_family("AutoencoderKL", "vae"),
    **{name: _clip_family(name) for name in (
        "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel", "CLIPVisionModelWithProjection")},
}


def class_name_of(config: dict) -> str | None:
    """diffusers configs name their class in `_class_name`, transformers configs in `architectures`."""
    return config.get("_class_name") or (config.get("architectures") or [None])[0]


def family_of(config: dict, source: str) -> Family:
    name = class_name_of(config)
    if name not in FAMILIES:
        raise ValueError(f"{source}: model class {name!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]()


def family_for_module(module) -> Family:
    """The family of a built module; CLIP towers pick the class with or without projection."""
    name = "IPAdapterPlus" if isinstance(module, ColourAdapter) else type(module).__name__
    if name in ("CLIPTextModel", "CLIPVisionModel") and module.config.with_projection:
        name += "WithProjection"
    if name not in FAMILIES:
        raise ValueError(f"no registered model family for {name}")
    return FAMILIES[name]()


def load_pretrained(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    param_dtype: Any = np.float32,
    **module_kwargs,
) -> tuple[Any, dict]:
    """Load a model as (Flax module, params) from a diffusers folder or from our converted checkpoint.
    For a model with BatchNorm statistics (the body-part network) the second item is its variables dict.

    path: a diffusers model folder (config.json + weights), a diffusers pipeline folder with
      `subfolder="unet"`, or a checkpoint written by `python -m convert to-flax` (component `subfolder`,
      default the only or the "unet" component).
    param_dtype: dtype of the returned params; None keeps the stored dtype (bit-exact round trips).
    module_kwargs: run-time module fields, e.g. dtype=jnp.bfloat16, attention_backend="cudnn", remat=True.
    Params are host numpy arrays in a nested dict; `jax.device_put` them with the sharding you want.
    """
    if flax_checkpoint.is_flax_checkpoint(path):
        ckpt_config = flax_checkpoint.read_config(path)
        components = ckpt_config["components"]
        name = subfolder or (next(iter(components)) if len(components) == 1 else "unet")
        config_dict, params = flax_checkpoint.load_component(path, name, ckpt_config)
        source = f"{path} (component {name})"
        family = family_of(config_dict, source)
        module = family.build(family.config_from_dict(config_dict, source), **module_kwargs)
        flax_checkpoint.check_params(params, family.shapes(module), source)
        if param_dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x, param_dtype), params)
        return module, to_model_layout(module, params)

    folder = Path(path) / subfolder if subfolder else Path(path)
    config_path = folder / "config.json"
    config_dict = files.read_json(config_path)
    family = family_of(config_dict, str(config_path))
    config = family.config_from_dict(config_dict, str(config_path))
    module = family.build(config, **module_kwargs)
    weights = torch_files.find_weights(folder, family.weights_name)
    state_dict = family.from_torch(torch_files.read_state_dict(weights), str(weights))
    params = torch_to_flax(state_dict, family.table(config), family.shapes(module), str(weights), param_dtype)
    return module, to_model_layout(module, params)


def save_pretrained(path: str | os.PathLike, module, params: dict, config_dict: dict | None = None) -> Path:
    """Write `module`'s config and `params` as a diffusers folder (config.json + safetensors).

    config_dict: the config.json to write; default the module's config in its library's format. Pass the original
    dict to keep fields we do not model (provenance, `_diffusers_version`).
    """
    family = family_for_module(module)
    folder = Path(path)
    params = unstack_blocks(params)  # a scanning module's stacks are written block by block, as diffusers has them
    state_dict = family.to_torch(flax_to_torch(params, family.table(module.config), f"{family.class_name} params"))
    torch_files.write_safetensors(state_dict, folder / family.weights_name, metadata={"format": "pt"})
    files.write_json(config_dict or family.config_to_dict(module.config), folder / "config.json")
    return folder


def init_from_pretrained_unet(path: str | os.PathLike, module, rng: jax.Array, *, branch: str = "rgb",
                              param_dtype: Any = np.float32) -> tuple[dict, list[str], str]:
    """Fresh params for `module` (a JointUNet or a ControlNetModel) started from a trained UNet checkpoint.

    path: a plain UNet (diffusers folder, pipeline folder with a unet/ subfolder, or our checkpoint), or, for a
    ControlNet, a trained JointUNet: then the ControlNet starts from `branch` and the shared trunk (DiffBody v2's
    stage-1 ControlNet). Returns (params, the copied Flax paths, a description of the source).
    """

    subfolder = "unet" if (Path(path) / "unet").is_dir() else None
    unet, unet_params = load_pretrained(path, subfolder=subfolder, param_dtype=param_dtype)
    target = module.clone(scan_layers=False) if scans_layers(module) else module  # paths copied in the file layout
    if isinstance(module, ControlNetModel) and isinstance(unet, JointUNet):
        params, copied = controlnet_from_joint_unet(unet_params, unet.config, target, rng, branch)
        return to_model_layout(module, params), copied, f"{path} (JointUNet branch {branch!r} + shared trunk)"
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"{path}: expected a UNet2DConditionModel (or a JointUNet for a ControlNet), "
                         f"found {type(unet).__name__}")
    if isinstance(module, JointUNet):
        params, copied = joint_unet_from_unet(unet_params, target, rng)
    elif isinstance(module, ControlNetModel):
        params, copied = controlnet_from_unet(unet_params, target, rng)
    else:
        raise ValueError(f"init from a UNet: {type(module).__name__} is neither a JointUNet nor a ControlNetModel")
    return to_model_layout(module, params), copied, str(path)


# config fields that change nothing a model computes (diffusers' default resolution)
INERT_FIELDS = ("sample_size",)


def _check_same_config(path: Path, loaded, module) -> None:
    """A folder's model must be the member it fills in every config field, not only in shape: e.g. a VAE's
    scaling_factor or a UNet's head count change what the weights compute while every shape stays."""
    if type(loaded) is not type(module) or not dataclasses.is_dataclass(getattr(module, "config", None)):
        return
    a, b = dataclasses.asdict(loaded.config), dataclasses.asdict(module.config)
    differ = [k for k in sorted(a) if k not in INERT_FIELDS and a[k] != b.get(k)]
    if differ:
        raise ValueError(f"{path}: its {type(module).__name__} config differs from the model's in "
                         + ", ".join(f"{k} (file {a[k]!r}, model {b.get(k)!r})" for k in differ)
                         + ": the weights would compute something else; set the model's config to the file's")


def load_weights_for(path: str | os.PathLike, module, param_dtype: Any = np.float32
                     ) -> tuple[dict, Callable[[str], bool]]:
    """What a file or folder holds for an already built `module`: (variables {"params"[, "batch_stats"]}, each
    collection a flat dict keyed by the module's own "/"-joined paths; a predicate true on the module's paths the
    file leaves as they are: its family's `fills`, e.g. a colour adapter in a Stage2Model). From a diffusers or
    converted folder (`load_pretrained`), or an original checkpoint file: SwinIR (KAIR `.pth`, DiffBIR `.ckpt`) or
    BPBreID (torchreid `.pth.tar`). Shapes are checked against `module` by the caller."""
    from flax import traverse_util

    from diffbody_jax.interop.bodypart import load_bodypart
    from diffbody_jax.interop.swinir import load_swinir

    path = Path(path)
    if path.is_dir():
        subfolder = None
        if not (path / "config.json").exists():  # a pipeline folder: take the member's component
            name = family_for_module(module).component
            subfolder = name if (path / name).is_dir() else None
        loaded_module, loaded = load_pretrained(path, subfolder=subfolder, param_dtype=param_dtype)
        _check_same_config(path, loaded_module, module)
        family = family_for_module(loaded_module)
        variables = dict(loaded) if family.variables else {"params": loaded}
        fills = family.fills
    elif isinstance(module, SwinIR):
        variables, fills = {"params": load_swinir(path, module.config, param_dtype)}, _keep
    elif isinstance(module, BodyPartNet):
        variables, fills = dict(load_bodypart(path, module.config, param_dtype)[1]), _keep
    else:
        raise ValueError(f"{path}: a single checkpoint file is read for SwinIR and BPBreID only; for "
                         f"{type(module).__name__} give a diffusers or converted folder")
    untouched = _nothing
    flat = {}
    for collection, tree in variables.items():
        flat[collection], leaves = fills(module, traverse_util.flatten_dict(tree, sep="/"))
        untouched = leaves if collection == "params" else untouched
    return flat, untouched
