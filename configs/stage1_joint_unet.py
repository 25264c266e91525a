"""DiffBody v2 stage 1, Eq. 1 (seed 002): the three-branch joint UNet learns RGB, depth and normal latents from the
pose latent and the caption, initialised from SD2.1-base.

  python -c "from diffbody_jax.config import load_config as c; print(c('stage1_joint_unet:variant=tiny').joint)"

Trained like every phase: diffbody train --config configs/stage1_joint_unet.py:variant=tiny --workdir runs/joint
--config.data.manifest=data/sample/manifest.jsonl (a manifest with depth and normal maps:
`diffbody data sample-set --stand-in-priors` writes one).

Variants:
  paper  the joint UNet of configs/joint_unet.py on SD2.1-base (copy_first 1, copy_last 1), SD2.1-base's VAE and
         text encoder, epsilon prediction (Eq. 1); the paper's numbers (seed 002, Sec. 4.2): 100,000 steps, batch
         64, Adam lr 1e-5, the five resolution buckets. Set the sources:
           --config.train.init_from="joint_unet=unet:SD21/unet,vae=SD21/vae,text_encoder=SD21/text_encoder"
  tiny   the tiny-sd21 joint UNet, the tiny VAE and text encoder; 64 x 64 crops: seconds on a CPU

What trains (joint.trainable): "sd_branch" (the paper: the RGB branch and the shared trunk, i.e. SD's UNet; the
depth and normal branches' own blocks and the fusion weights frozen) or "all" (the authors' script). The authors'
script also uses v-prediction on SD2.1-768 (diffusion.prediction_type=v_prediction with diffusion.scheduler=
sd21-768v and a joint UNet of variant sd21-768v) and can move the depth, normal and pose latents to the RGB
latents' statistics (joint.normalize_latents=True, their statistics in joint.latent_stats).
"""

import pathlib

import ml_collections

from diffbody_jax.config import (
    at_scale,
    group_section,
    parse_arg,
    text_section,
    tiny_training_sections,
    training_sections,
)

HERE = pathlib.Path(__file__).parent
MEMBERS = {
    variant: dict(joint_unet=f"joint_unet:variant={variant_of}", vae=f"vae:variant={variant_of}",
                  text_encoder=f"clip:variant={variant_of}")
    for variant, variant_of in (("paper", "sd21-base"), ("tiny", "tiny"))
}
# The authors' dataset statistics of scaled SD VAE latents per prior: (mean, std).
AUTHORS_LATENT_STATS = {"rgb": [0.14654, 1.03744], "depth": [0.21360, 1.20629], "normal": [0.60303, 0.91429],
                        "pose": [-0.25994, 1.38366]}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    tiny = arg["variant"] == "tiny"
    config = ml_collections.ConfigDict()
    config.model = group_section(MEMBERS, arg["variant"], "configs/stage1_joint_unet.py")
    config.phase = "stage1_joint_unet"
    config.diffusion = ml_collections.ConfigDict(dict(
        scheduler="sd21-base",  # configs/diffusers/<name>/scheduler
        prediction_type="epsilon",  # Eq. 1; the authors' script: v_prediction (on SD2.1-768)
    ))
    config.joint = ml_collections.ConfigDict(dict(
        trainable="sd_branch",  # the paper; "all": the authors' script
        normalize_latents=False,
        latent_stats=AUTHORS_LATENT_STATS,
    ))
    config.text = text_section("" if tiny else str(HERE / "diffusers/sd21-base/tokenizer"), "!")  # SD2.1 pads "!"
    maps = ["pose", "depth", "normal"]
    if tiny:
        tiny_training_sections(config, maps)
    else:
        training_sections(config, steps=100_000, batch_size=64, learning_rate=1e-5, **{"data.maps": maps})
        at_scale(config.model)  # bf16 compute, remat, bounded attention: docs/scaling.md
    config.lock()
    return config
