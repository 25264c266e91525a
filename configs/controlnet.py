"""ControlNet architectures: the real SD2.1 / SDXL ControlNets, DiffBody's latent-condition variants, tiny ones.

  diffbody convert init-from-unet --unet stable-diffusion-2-1-base --config configs/controlnet.py:variant=tiny-v1 \
      --dst ckpt/controlnet-v1

(from the real SD2.1-base folder: variant=diffbody-v1)

Variants:
  controlnet-sd21      configs/diffusers/controlnet-sd21/config.json (an official SD2.1 depth ControlNet)
  controlnet-sdxl      configs/diffusers/controlnet-sdxl/config.json (diffusers' SDXL canny ControlNet)
  diffbody-v1          SD2.1-base ControlNet with a latent condition [E(I_reg), E(I_pose), I_attn]: 4 + 4 + 1
  diffbody-v2-stage1   SD2.1-base ControlNet of the joint UNet: sample = the RGB branch's 8-channel input
                       (noisy latent + pose latent), latent condition E(I_ir) with 4 channels; the base of
                       configs/joint_unet.py's default (seed 002, Sec. 4.2)
  diffbody-v2-stage1-768v   the same on SD2.1-768-v, for a joint UNet of variant sd21-768v (the authors' code)
  diffbody-v2-stage2   SDXL-base ControlNet whose condition fuses I_ir, I_pose, I_depth, I_normal (3 channels each,
                       image resolution) through one pixel embedding each: sum_i alpha_i F_i, softmax alphas
  tiny-sd21, tiny-sdxl the tiny UNets of configs/unet.py with a 4-level pixel embedding (8, 8, 16, 16)
  tiny-v1, tiny-v2-stage1   the DiffBody variants on the tiny-sd21 UNet
  mid-v1               the v1 variant on configs/unet.py's mid-sd21 (a benchmark size)
  tiny-v2-stage2       the stage-2 variant on the tiny-sdxl UNet
"""

import json
import pathlib

import ml_collections

from diffbody_jax.config import model_section, parse_arg

DIFFUSERS_DIR = pathlib.Path(__file__).parent / "diffusers"
UNET_CONFIG = pathlib.Path(__file__).parent / "unet.py"

REAL = ("controlnet-sd21", "controlnet-sdxl")
# variant -> (UNet variant of configs/unet.py, ControlNet fields over diffusers' from_unet defaults)
FROM_UNET = {
    "diffbody-v1": ("sd21-base", dict(conditioning_channels=9, conditioning_embedding_type="latent")),
    "diffbody-v2-stage1": (
        "sd21-base", dict(in_channels=8, conditioning_channels=4, conditioning_embedding_type="latent")
    ),
    "diffbody-v2-stage1-768v": (
        "sd21-768v", dict(in_channels=8, conditioning_channels=4, conditioning_embedding_type="latent")
    ),
    "diffbody-v2-stage2": ("sdxl-base", dict(conditioning_embedding_type="prior_fusion")),
    "tiny-sd21": ("tiny-sd21", dict(conditioning_embedding_out_channels=[8, 8, 16, 16])),
    "tiny-sdxl": ("tiny-sdxl", dict(conditioning_embedding_out_channels=[8, 8, 16, 16])),
    "tiny-v1": ("tiny-sd21", dict(conditioning_channels=9, conditioning_embedding_type="latent")),
    "mid-v1": ("mid-sd21", dict(conditioning_channels=9, conditioning_embedding_type="latent")),
    "tiny-v2-stage1": (
        "tiny-sd21", dict(in_channels=8, conditioning_channels=4, conditioning_embedding_type="latent")
    ),
    "tiny-v2-stage2": (
        "tiny-sdxl",
        dict(conditioning_embedding_out_channels=[8, 8, 16, 16], conditioning_embedding_type="prior_fusion"),
    ),
}


def diffusers_config(variant: str) -> dict:
    """The ControlNet's config.json dict (diffusers' ControlNetModel fields, plus ours for latent conditions)."""
    from diffbody_jax.config import load_config
    from diffbody_jax.models.controlnet import ControlNetConfig
    from diffbody_jax.models.unet import UNetConfig

    if variant in REAL:
        return json.loads((DIFFUSERS_DIR / variant / "config.json").read_text())
    if variant not in FROM_UNET:
        raise ValueError(f"unknown ControlNet variant {variant!r}; known: {list(REAL) + sorted(FROM_UNET)}")
    unet_variant, overrides = FROM_UNET[variant]
    unet = load_config(f"{UNET_CONFIG}:variant={unet_variant}").model.diffusers.to_dict()
    return ControlNetConfig.from_unet(UNetConfig.from_dict(unet), **overrides).to_dict()


def get_config(arg=None):
    arg = parse_arg(arg, variant="controlnet-sd21")
    config = ml_collections.ConfigDict()
    config.model = model_section(name="controlnet", variant=arg["variant"], diffusers=diffusers_config(arg["variant"]))
    config.lock()
    return config
