"""A pretrained base: the text-conditional latent diffusion UNet every DiffBody model starts from, trained (tiny) or
fine-tuned (real) on a manifest's photos and captions.

  python -c "from diffbody_jax.config import load_config as c; print(c('base_unet:variant=tiny-sd21').diffusion)"

Trained like every phase: diffbody train --config configs/base_unet.py:variant=tiny-sd21 --workdir runs/unet
--config.data.manifest=data/sample/manifest.jsonl --config.train.init_from=vae=runs/vae

Variants:
  sd21-base  fine-tune SD2.1-base's UNet (epsilon) on your photos; its VAE and text encoder frozen. Start it from
             the download: --config.train.init_from="unet=SD21/unet,vae=SD21/vae,text_encoder=SD21/text_encoder"
  sdxl-base  the same for SDXL-base (both text encoders frozen; its size conditioning from each crop)
  tiny-sd21  the tiny-sd21 UNet on the tiny VAE (latents at 1/2) and 2-layer text encoder of v1's tiny variant
  tiny-sdxl  the tiny-sdxl UNet on the tiny4 VAE and the two tiny SDXL text encoders of stage 2's tiny variant
The SD2.1-like variants train phase base_unet, the SDXL-like ones base_unet_sdxl (training/phases.py). Captions
are dropped to "" with text.drop_prob (0.1: SD's own recipe drops 10%), so classifier-free guidance at restore
time has an unconditional model to contrast with. The export is the UNet in the diffusers layout with the run's
contract (schedule and prediction type) beside it; a ControlNet phase then starts from it (unet=RUNS/unet).
"""

import pathlib

import ml_collections

from diffbody_jax.config import at_scale, group_section, parse_arg, text_section, training_sections

HERE = pathlib.Path(__file__).parent
MEMBERS = {
    "sd21-base": dict(unet="unet:variant=sd21-base", vae="vae:variant=sd21-base",
                      text_encoder="clip:variant=sd21-base"),
    "sdxl-base": dict(unet="unet:variant=sdxl-base", vae="vae:variant=sdxl-base", text_encoder="clip:variant=sdxl-base",
                      text_encoder_2="clip:variant=sdxl-base-2"),
    "tiny-sd21": dict(unet="unet:variant=tiny-sd21", vae="vae:variant=tiny", text_encoder="clip:variant=tiny"),
    "tiny-sdxl": dict(unet="unet:variant=tiny-sdxl", vae="vae:variant=tiny4", text_encoder="clip:variant=tiny-sdxl",
                      text_encoder_2="clip:variant=tiny-sdxl-2"),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="sd21-base")
    variant = arg["variant"]
    config = ml_collections.ConfigDict()
    config.model = group_section(MEMBERS, variant, "configs/base_unet.py")
    sdxl = "sdxl" in variant
    config.phase = "base_unet_sdxl" if sdxl else "base_unet"
    config.diffusion = ml_collections.ConfigDict(dict(
        scheduler="sdxl-base" if sdxl else "sd21-base",  # configs/diffusers/<name>/scheduler
        prediction_type="epsilon",  # both bases predict eps; v_prediction trains a v model (as SD2.1-768)
        noise_offset=0.0,
        min_snr_gamma=ml_collections.config_dict.placeholder(float),  # None: off; overridable with a number
    ))
    tiny = variant.startswith("tiny")
    if sdxl:
        folder = HERE / "diffusers/sdxl-base"
        config.text = text_section("" if tiny else str(folder / "tokenizer"), "<|endoftext|>",
                                   "" if tiny else str(folder / "tokenizer_2"), "!")
    else:
        config.text = text_section("" if tiny else str(HERE / "diffusers/sd21-base/tokenizer"), "!")
    config.text.drop_prob = 0.1
    if tiny:  # the tiny zoo's bases: from scratch on 64 x 64 crops
        training_sections(config, steps=2000, batch_size=8, learning_rate=5e-4,
                          **{"data.buckets": [[64, 64]], "train.log_every": 50, "checkpoint.every": 500,
                             "train.ema_decay": 0.99})
    else:  # ours (the papers start from the released weights), to be set for your data: a gentle fine-tune
        training_sections(config, steps=20_000, batch_size=64, learning_rate=1e-5, **{"train.ema_decay": 0.9999})
        at_scale(config.model)  # bf16 compute, remat, bounded attention: docs/scaling.md
    config.lock()
    return config
