"""DiffBody v2 stage 2, Eq. 3 (seed 002): SDXL UNet frozen, the prior-fusion ControlNet over I_ir, pose, depth and
normal trained, with SDXL's VAE, both text encoders and the stage-0 SwinIR frozen inside the step.

  python -c "from diffbody_jax.config import load_config as c; print(c('stage2_controlnet:variant=tiny').adapter)"

Variants:
  paper  configs/stage2.py:sdxl (SDXL-base UNet with the colour adapter's kernels, off in this phase; the
         diffbody-v2-stage2 ControlNet), SDXL-base's VAE and text encoders, DiffBIR's SwinIR; the paper's numbers
         (Sec. 4.2): 100,000 steps, "a batch size of 32 and gradient accumulation of 2", which we read as 32 per
         micro-step and two accumulated, an effective batch of 64 (data.batch_size is the global batch of one
         optimizer step, train.grad_accum splits it into micro-steps); Adam lr 1e-5, the five buckets. Sources:
           --config.train.init_from="stage2/unet=SDXL/unet,stage2/controlnet=CN,vae=SDXL/vae,
             text_encoder=SDXL/text_encoder,text_encoder_2=SDXL/text_encoder_2,swinir=RUNS/swinir"
         (SDXL a stable-diffusion-xl-base-1.0 folder; CN `diffbody convert init-from-controlnet`'s output, or
         unet:SDXL/unet to start the ControlNet from the UNet)
  tiny   configs/stage2.py:tiny with a tiny VAE (latents at 1/8, as the ControlNet's prior embeddings expect), tiny
         text encoders and SwinIR; 64 x 64 crops

In the step (training.losses.stage2_inputs): latents = E(target); priors = SwinIR(degraded), pose, depth, normal at
image resolution in [0, 1]; SDXL's text conditioning from the caption, and its size conditioning from each crop's
original image size and crop corner (the data pipeline's original_size and crop_top_left).
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
# the denoiser and the encoders that run in the step (configs/colour_adapter.py adds the CLIP image encoder)
MEMBERS = {
    "paper": dict(stage2="stage2:variant=sdxl", vae="vae:variant=sdxl-base", text_encoder="clip:variant=sdxl-base",
                  text_encoder_2="clip:variant=sdxl-base-2", swinir="swinir:variant=diffbir"),
    "tiny": dict(stage2="stage2:variant=tiny", vae="vae:variant=tiny4", text_encoder="clip:variant=tiny-sdxl",
                 text_encoder_2="clip:variant=tiny-sdxl-2", swinir="swinir:variant=tiny-diffbir"),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    tiny = arg["variant"] == "tiny"
    config = ml_collections.ConfigDict()
    config.model = group_section(MEMBERS, arg["variant"], "configs/stage2_controlnet.py")
    config.phase = "stage2_controlnet"
    config.diffusion = ml_collections.ConfigDict(dict(
        scheduler="sdxl-base", prediction_type="epsilon", noise_offset=0.0,
        min_snr_gamma=ml_collections.config_dict.placeholder(float),  # None: off; overridable with a number
    ))
    config.adapter = ml_collections.ConfigDict(dict(
        image="ir",  # the colour adapter's CLIP image in training (phase colour_adapter): ir | target
        clip_fit="auto",  # how that image meets CLIP's square: auto | pad | center_crop (conditioning/clip_image.py)
        # what CFG's unconditional pass feeds the adapter when restoring: "keep" (the same image features: training
        # never drops the image, so only the text is guided) | "zeros" (features of an all-zero image, diffusers')
        uncond_image="keep",
    ))
    sdxl = HERE / "diffusers/sdxl-base"
    config.text = text_section("" if tiny else str(sdxl / "tokenizer"), "<|endoftext|>",
                               "" if tiny else str(sdxl / "tokenizer_2"), "!")
    maps = ["pose", "depth", "normal"]
    if tiny:
        tiny_training_sections(config, maps)
    else:
        training_sections(config, steps=100_000, batch_size=64, learning_rate=1e-5,
                          **{"data.maps": maps, "train.grad_accum": 2})
        at_scale(config.model)  # bf16 compute, remat, bounded attention: docs/scaling.md
    config.lock()
    return config
