"""Convert whole model or pipeline folders between diffusers' PyTorch layout and our orbax checkpoints.

  python -m convert to-flax  --src stable-diffusion-2-1-base       --dst ckpt/sd21-base
  python -m convert to-flax  --src stable-diffusion-2-1-base/unet  --dst ckpt/sd21-unet --param-dtype bfloat16
  python -m convert to-torch --src ckpt/sd21-base --dst exported/sd21-base
  python -m convert init-from-unet --unet stable-diffusion-2-1 --config configs/joint_unet.py:variant=sd21-base \
      --dst ckpt/joint-unet
  python -m convert init-from-unet --unet ckpt/joint-unet --config configs/controlnet.py:variant=diffbody-v2-stage1 \
      --dst ckpt/controlnet-stage1 --branch rgb
  python -m convert init-from-unet --unet stable-diffusion-2-1-base \
      --config configs/controlnet.py:variant=diffbody-v1 --dst ckpt/controlnet-v1 --format torch
  python -m convert swinir-to-flax --src general_swinir_v1.ckpt --config configs/swinir.py:variant=diffbir \
      --dst ckpt/swinir
  python -m convert swinir-to-torch --src ckpt/swinir --dst exported/swinir.pth
  python -m convert bodypart-to-flax --src bpbreid_market1501_hrnet32_10642.pth --dst ckpt/bodypart
  python -m convert bodypart-to-flax --imagenet hrnetv2_w32_imagenet_pretrained.pth --dst ckpt/bodypart-init
  python -m convert bodypart-to-torch --src ckpt/bodypart --dst exported/bpbreid.pth.tar
  python -m convert init-from-controlnet --controlnet controlnet-canny-sdxl-1.0 \
      --config configs/controlnet.py:variant=diffbody-v2-stage2 --dst ckpt/controlnet-stage2
  python -m convert ip-adapter-to-flax --src ip-adapter-plus_sdxl_vit-h.bin --dst ckpt/colour-adapter
  python -m convert ip-adapter-to-torch --src ckpt/colour-adapter --dst exported/ip-adapter-plus_sdxl_vit-h.bin

A pipeline folder converts every component whose `_class_name` we support and lists the ones skipped.
`init-from-unet` starts a ControlNet or a joint UNet (the config file's `model` section) from a trained UNet,
or the stage-1 ControlNet from a trained JointUNet folder (`--branch rgb`: that branch and the shared trunk);
`init-from-controlnet` starts the stage-2 prior-fusion ControlNet from a trained (diffusers) ControlNet, every
prior's embedding a copy of its conditioning embedding. `ip-adapter-*` move the colour adapter's
IP-Adapter-Plus weights (original .bin/.safetensors, or a diffusers UNet holding them) to and from orbax.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from diffbody_jax import files
from diffbody_jax.config import load_config
from diffbody_jax.interop import flax_checkpoint, pretrained
from diffbody_jax.interop.bodypart import backbone_from_imagenet, infer_config, load_bodypart, save_bodypart
from diffbody_jax.interop.ip_adapter import load_ip_adapter, original_state_dict, write_ip_adapter
from diffbody_jax.interop.mapping import flatten_params
from diffbody_jax.interop.swinir import load_swinir, save_swinir
from diffbody_jax.interop.torch_files import read_state_dict
from diffbody_jax.models.bodypart import BodyPartNet
from diffbody_jax.models.controlnet import build_controlnet, prior_fusion_from_controlnet
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.swinir import SwinIRConfig
from diffbody_jax.models.unet import UNetConfig

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "keep": None}


def _model_folders(src: Path) -> tuple[str, dict[str, Path], list[str]]:
    """(layout, {component: folder}, skipped notes) for a model folder or a pipeline folder."""
    if (src / "config.json").exists():
        config = files.read_json(src / "config.json")
        family = pretrained.family_of(config, str(src / "config.json"))
        return "model", {family.component: src}, []
    subdirs = sorted(p for p in src.iterdir() if (p / "config.json").exists()) if src.is_dir() else []
    if not subdirs:
        raise FileNotFoundError(f"{src}: neither a model folder (config.json) nor a pipeline folder")
    found, skipped = {}, []
    for sub in subdirs:
        name = pretrained.class_name_of(files.read_json(sub / "config.json"))
        if name in pretrained.FAMILIES:
            found[sub.name] = sub
        else:
            skipped.append(f"{sub.name} ({name}: not supported yet)")
    if not found:
        raise ValueError(f"{src}: no supported component; skipped {', '.join(skipped)}")
    return "pipeline", found, skipped


def to_flax(src: Path, dst: Path, param_dtype, overwrite: bool) -> None:
    layout, folders, skipped = _model_folders(src)
    components = {}
    for name, folder in folders.items():
        _, params = pretrained.load_pretrained(folder, param_dtype=param_dtype)
        components[name] = (files.read_json(folder / "config.json"), params)
        print(f"  {name}: {folder} -> {len(flatten_params(params))} params")
    flax_checkpoint.save_components(dst, components, layout=layout, overwrite=overwrite)
    for note in skipped:
        print(f"  skipped {note}")
    print(f"wrote {dst}")


def to_torch(src: Path, dst: Path, overwrite: bool) -> None:
    config = flax_checkpoint.read_config(src)
    for name in config["components"]:
        out = dst if config["layout"] == "model" else dst / name
        if (out / "config.json").exists() and not overwrite:
            raise FileExistsError(f"{out} already holds a model; pass --overwrite to replace it")
        module, params = pretrained.load_pretrained(src, subfolder=name, param_dtype=None)
        pretrained.save_pretrained(out, module, params, config_dict=config["components"][name])
        print(f"  {name}: -> {out}")
    print(f"wrote {dst}")


def init_from_unet(unet_src: Path, config_spec: str, dst: Path, fmt: str, seed: int, overwrite: bool,
                   branch: str = "rgb") -> None:
    """A JointUNet or ControlNet (the config's model) from a plain UNet folder, or a ControlNet (DiffBody v2's
    stage-1 ControlNet) from a trained JointUNet folder: its `branch` and the shared trunk."""
    model_config = load_config(config_spec).model
    if model_config.get("name") not in ("joint_unet", "controlnet"):
        raise ValueError(f"{config_spec}: model.name={model_config.get('name')!r}; init-from-unet builds a "
                         f"joint_unet or a controlnet")
    module = build_model(model_config)
    params, copied, source = pretrained.init_from_pretrained_unet(unet_src, module, jax.random.key(seed),
                                                                  branch=branch)
    params = jax.device_get(params)
    roots = sorted({p.split("/")[0] for p in copied})
    print(f"  copied {len(copied)} tensors from {source}: {', '.join(roots)}")
    print(f"  fresh: {len(flatten_params(params)) - len(copied)} tensors")
    _save_model(module, params, dst, fmt, overwrite)


def swinir_to_flax(src: Path, config_spec: str, dst: Path, param_dtype, overwrite: bool) -> None:
    config = SwinIRConfig.from_dict(load_config(config_spec).model.swinir.to_dict(), config_spec)
    params = load_swinir(src, config, param_dtype)
    flax_checkpoint.save_components(dst, {"swinir": (config.to_dict(), params)}, layout="model", overwrite=overwrite)
    print(f"wrote {dst} ({len(flatten_params(params))} tensors from {src})")


def swinir_to_torch(src: Path, dst: Path, overwrite: bool) -> None:
    config_dict, params = flax_checkpoint.load_component(src, "swinir")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    save_swinir(dst, SwinIRConfig.from_dict(config_dict, str(src)), params)
    print(f"wrote {dst}")


def bodypart_to_flax(src: Path | None, imagenet: Path | None, config_spec: str, dst: Path, overwrite: bool) -> None:
    if src is None and imagenet is None:
        raise ValueError("bodypart-to-flax needs --src (a BPBreID checkpoint) or --imagenet (HRNet weights)")
    model_config = load_config(config_spec).model
    if model_config.get("name") != "bodypart":
        raise ValueError(f"{config_spec}: model.name={model_config.get('name')!r}; bodypart-to-flax needs a body-part "
                         "network config (configs/bodypart.py)")
    base = build_model(model_config).config
    if src is not None:
        config, variables = load_bodypart(src, infer_config(read_state_dict(src), base))
        print(f"  {src}: {config.num_parts} parts, {config.dim_reduce} to {config.embed_dim}, "
              f"{config.num_identities} identities")
    else:
        config = base
        variables = BodyPartNet(config=config).init_variables(jax.random.key(0))
        print("  part head: fresh (random) weights")
    if imagenet is not None:
        variables = backbone_from_imagenet(read_state_dict(imagenet), variables, str(imagenet))
        print(f"  backbone: {imagenet}")
    flax_checkpoint.save_components(dst, {"bodypart": (config.to_dict(), variables)}, layout="model",
                                    overwrite=overwrite)
    print(f"wrote {dst} ({len(flatten_params(variables))} tensors)")


def bodypart_to_torch(src: Path, dst: Path, overwrite: bool) -> None:
    _, variables = flax_checkpoint.load_component(src, "bodypart")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    save_bodypart(dst, variables)
    print(f"wrote {dst}")


def _save_model(module, params, dst: Path, fmt: str, overwrite: bool) -> None:
    family = pretrained.family_for_module(module)
    if fmt == "torch":
        if (dst / "config.json").exists() and not overwrite:
            raise FileExistsError(f"{dst} already holds a model; pass --overwrite to replace it")
        pretrained.save_pretrained(dst, module, params)
    else:
        flax_checkpoint.save_components(dst, {family.component: (family.config_to_dict(module.config), params)},
                                        layout="model", overwrite=overwrite)
    print(f"wrote {dst}")


def init_from_controlnet(src: Path, config_spec: str, dst: Path, fmt: str, seed: int, overwrite: bool) -> None:
    module = build_controlnet(load_config(config_spec).model)
    subfolder = "controlnet" if (src / "controlnet").is_dir() else None
    source, source_params = pretrained.load_pretrained(src, subfolder=subfolder)
    if type(source).__name__ != "ControlNetModel":
        raise ValueError(f"{src}: expected a ControlNetModel, found {type(source).__name__}")
    params, copied = prior_fusion_from_controlnet(source_params, module, jax.random.key(seed))
    print(f"  copied {len(copied)} tensors from {src}; priors {', '.join(module.config.prior_names)} each start as "
          f"a copy of its conditioning embedding; alphas {module.fusion_alphas(params)}")
    _save_model(module, jax.device_get(params), dst, fmt, overwrite)


COLOUR_ADAPTER = "colour_adapter"


def ip_adapter_to_flax(src: Path, unet_spec: str, dst: Path, param_dtype, overwrite: bool) -> None:
    unet_dict = load_config(unet_spec).model.diffusers.to_dict()
    resampler, params = load_ip_adapter(src, UNetConfig.from_dict(unet_dict, unet_spec), dtype=param_dtype)
    config = {"_class_name": "IPAdapterPlus", "resampler": resampler.config.to_dict(), "unet": unet_dict}
    flax_checkpoint.save_components(dst, {COLOUR_ADAPTER: (config, params)}, layout="model", overwrite=overwrite)
    n = len(flatten_params(params["ip_adapter"]))
    print(f"wrote {dst}: Resampler {resampler.config} and {n} to_k_ip/to_v_ip kernels from {src}")


def ip_adapter_to_torch(src: Path, dst: Path, overwrite: bool) -> None:
    config, params = flax_checkpoint.load_component(src, COLOUR_ADAPTER)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    write_ip_adapter(dst, original_state_dict(params, UNetConfig.from_dict(config["unet"], str(src))))
    print(f"wrote {dst}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-flax", help="diffusers folder -> orbax checkpoint")
    p.set_defaults(run=lambda a: to_flax(a.src, a.dst, _DTYPES[a.param_dtype], a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--param-dtype", default="float32", choices=sorted(_DTYPES),
                   help="dtype of the stored params; 'keep' keeps the source dtype")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("to-torch", help="orbax checkpoint -> diffusers folder (safetensors)")
    p.set_defaults(run=lambda a: to_torch(a.src, a.dst, a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("init-from-unet", help="a ControlNet or joint UNet initialised from a UNet's weights")
    p.set_defaults(run=lambda a: init_from_unet(a.unet, a.config, a.dst, a.format, a.seed, a.overwrite, a.branch))
    p.add_argument("--unet", required=True, type=Path, help="UNet folder, pipeline folder or our checkpoint")
    p.add_argument("--config", required=True, help="configs/joint_unet.py:... or configs/controlnet.py:...")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--format", default="flax", choices=["flax", "torch"],
                   help="flax: our orbax checkpoint; torch: a diffusers-style folder (safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters that are not copied")
    p.add_argument("--branch", default="rgb",
                   help="with a JointUNet --unet and a ControlNet --config: the branch the ControlNet starts from")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("swinir-to-flax", help="official/DiffBIR SwinIR .pth/.ckpt -> orbax checkpoint")
    p.set_defaults(run=lambda a: swinir_to_flax(a.src, a.config, a.dst, _DTYPES[a.param_dtype], a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--config", required=True, help="configs/swinir.py:variant=...")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--param-dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("swinir-to-torch", help="orbax SwinIR checkpoint -> .pth ({'params': ...}) or .safetensors")
    p.set_defaults(run=lambda a: swinir_to_torch(a.src, a.dst, a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("bodypart-to-flax", help="BPBreID checkpoint and/or HRNet ImageNet weights -> orbax")
    p.set_defaults(run=lambda a: bodypart_to_flax(a.src, a.imagenet, a.config, a.dst, a.overwrite))
    p.add_argument("--src", type=Path, help="torchreid BPBreID .pth / .pth.tar (state_dict or bare, module. ok)")
    p.add_argument("--imagenet", type=Path, help="HRNet-W32 ImageNet weights (timm or HRNet-Image-Classification)")
    p.add_argument("--config", default="configs/bodypart.py:variant=bpbreid")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("bodypart-to-torch", help="orbax body-part checkpoint -> torchreid .pth.tar or .safetensors")
    p.set_defaults(run=lambda a: bodypart_to_torch(a.src, a.dst, a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("init-from-controlnet", help="the stage-2 prior-fusion ControlNet from a trained ControlNet")
    p.set_defaults(run=lambda a: init_from_controlnet(a.controlnet, a.config, a.dst, a.format, a.seed, a.overwrite))
    p.add_argument("--controlnet", required=True, type=Path, help="diffusers ControlNet folder or our checkpoint")
    p.add_argument("--config", default="configs/controlnet.py:variant=diffbody-v2-stage2")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--format", default="flax", choices=["flax", "torch"])
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters that are not copied")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("ip-adapter-to-flax", help="IP-Adapter-Plus .bin/.safetensors (either layout) -> orbax")
    p.set_defaults(run=lambda a: ip_adapter_to_flax(a.src, a.unet_config, a.dst, _DTYPES[a.param_dtype], a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--unet-config", default="configs/unet.py:variant=sdxl-base",
                   help="the UNet whose cross-attentions the to_k_ip/to_v_ip pairs belong to")
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--param-dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("ip-adapter-to-torch", help="orbax colour adapter -> IP-Adapter-Plus .bin or .safetensors")
    p.set_defaults(run=lambda a: ip_adapter_to_torch(a.src, a.dst, a.overwrite))
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
