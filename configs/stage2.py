"""DiffBody v2 stage 2: SDXL UNet + prior-fusion ControlNet + colour adapter (diffbody_jax/models/stage2.py).

  diffbody convert init-from-controlnet --controlnet controlnet-sdxl-tiny \
      --config configs/controlnet.py:variant=tiny-v2-stage2 --dst ckpt/controlnet-stage2
  diffbody convert ip-adapter-to-flax --src ip-adapter-tiny.bin --unet-config configs/unet.py:variant=tiny-sdxl \
      --dst ckpt/colour-adapter

(with the real files: any diffusers SDXL ControlNet folder and variant=diffbody-v2-stage2 (the default);
ip-adapter-plus_sdxl_vit-h.bin with the default --unet-config, SDXL-base)

Variants:
  sdxl   SDXL-base UNet, configs/controlnet.py:diffbody-v2-stage2, IP-Adapter-Plus-XL's Resampler (16 queries,
         width 1280, 4 layers of 20 heads of 64, ViT-H/14 features of width 1280 in, 2048 out)
  tiny   the tiny-sdxl UNet, tiny-v2-stage2 ControlNet and a tiny Resampler (CLIP width 24), for tests and demos
Arguments: phase = controlnet (Eq. 3) | colour_adapter (Eq. 4): the trainable subset and the paper's
hyperparameters for it (seed 002, Sec. 4): ControlNet + fusion 100k steps, batch 32 with 2 accumulation steps,
Adam lr 1e-5; adapter 200k steps, batch 64, Adam lr 1e-4; in the engine's `train`, `data` and `optim` sections.
The data preparation (VAE and text encoders inside the step) lands with the stage-2 training program.
"""

import pathlib

import ml_collections

from diffbody_jax.config import load_config, model_section, parse_arg, training_sections

HERE = pathlib.Path(__file__).parent
VARIANTS = {"sdxl": ("sdxl-base", "diffbody-v2-stage2"), "tiny": ("tiny-sdxl", "tiny-v2-stage2")}
PHASES = {
    "controlnet": dict(steps=100_000, batch_size=32, grad_accum=2, learning_rate=1e-5),
    "colour_adapter": dict(steps=200_000, batch_size=64, grad_accum=1, learning_rate=1e-4),
}


def get_config(arg=None):
    from diffbody_jax.models.ip_adapter import ResamplerConfig

    arg = parse_arg(arg, variant="sdxl", phase="controlnet")
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"unknown stage-2 variant {arg['variant']!r}; known: {sorted(VARIANTS)}")
    if arg["phase"] not in PHASES:
        raise ValueError(f"unknown stage-2 phase {arg['phase']!r}; known: {sorted(PHASES)}")
    unet_variant, cn_variant = VARIANTS[arg["variant"]]
    unet = load_config(f"{HERE / 'unet.py'}:variant={unet_variant}").model.diffusers.to_dict()
    controlnet = load_config(f"{HERE / 'controlnet.py'}:variant={cn_variant}").model.diffusers.to_dict()
    tiny = arg["variant"] == "tiny"
    resampler = ResamplerConfig.tiny(output_dims=unet["cross_attention_dim"]) if tiny else ResamplerConfig()

    config = ml_collections.ConfigDict()
    config.model = model_section(name="stage2", variant=arg["variant"], unet=unet, controlnet=controlnet,
                                 resampler=resampler.to_dict())
    config.phase = f"stage2_{arg['phase']}"  # a training phase of diffbody_jax.training.phases
    config.diffusion = ml_collections.ConfigDict(dict(
        prediction_type="epsilon", noise_offset=0.0,
        min_snr_gamma=ml_collections.config_dict.placeholder(float),  # None: off; overridable with a number
    ))
    numbers = PHASES[arg["phase"]]
    training_sections(config, steps=numbers["steps"], batch_size=numbers["batch_size"],
                      learning_rate=numbers["learning_rate"], **{"train.grad_accum": numbers["grad_accum"]})
    config.lock()
    return config
