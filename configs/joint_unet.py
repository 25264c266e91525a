"""Joint UNet of DiffBody v2 stage 1 (RGB, depth and normal branches over SD2.1): see diffbody_jax/models/joint_unet.py.

  diffbody convert init-from-unet --unet stable-diffusion-2-1-base/unet --config configs/joint_unet.py:variant=tiny \\
      --dst ckpt/joint-unet

(from the real SD2.1-base folder: the default variant, sd21-base)

Variants (UNet of configs/unet.py with conv_in widened to 8 inputs: noisy latent + pose latent):
  sd21-base   the default: SD2.1-base (eps), the base seed 002 names for stage 1 (Sec. 4.2)
  sd21-768v   the authors' code's base (stabilityai/stable-diffusion-2-1, 768 px, v-prediction): an option
  tiny        the tiny-sd21 UNet, for tests and demos
The stage-1 ControlNet of configs/controlnet.py must sit on the same base: diffbody-v2-stage1 (sd21-base),
diffbody-v2-stage1-768v, tiny-v2-stage1 (tiny).
Arguments: copy_first (per-branch down blocks, default 1), copy_last (per-branch up blocks, default 1),
time_ids (0: no size conditioning; 6: original size, crop top-left, target size; 8: + aesthetic score and
watermark probability), branches (default rgb+depth+normal).
"""

import pathlib

import ml_collections

from diffbody_jax.config import load_config, model_section, parse_arg

UNET_CONFIG = pathlib.Path(__file__).parent / "unet.py"
UNET_VARIANT = {"sd21-768v": "sd21-768v", "sd21-base": "sd21-base", "tiny": "tiny-sd21"}


def get_config(arg=None):
    from diffbody_jax.models.joint_unet import JointUNetConfig
    from diffbody_jax.models.unet import UNetConfig

    arg = parse_arg(arg, variant="sd21-base", copy_first=1, copy_last=1, time_ids=0, branches="rgb+depth+normal")
    if arg["variant"] not in UNET_VARIANT:
        raise ValueError(f"unknown JointUNet variant {arg['variant']!r}; known: {sorted(UNET_VARIANT)}")
    unet = load_config(f"{UNET_CONFIG}:variant={UNET_VARIANT[arg['variant']]}").model.diffusers.to_dict()
    joint = JointUNetConfig.from_unet(
        UNetConfig.from_dict(unet), in_channels=8, num_time_ids=arg["time_ids"],
        addition_time_embed_dim=8 if arg["variant"] == "tiny" else 256,
        branches=tuple(arg["branches"].split("+")), copy_first_n_block=arg["copy_first"],
        copy_last_n_block=arg["copy_last"],
    )
    config = ml_collections.ConfigDict()
    config.model = model_section(name="joint_unet", variant=arg["variant"], unet_variant=UNET_VARIANT[arg["variant"]],
                                 config=joint.to_dict())
    config.lock()
    return config
