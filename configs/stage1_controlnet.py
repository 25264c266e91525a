"""DiffBody v2 stage 1, Eq. 2 (seed 002): the trained joint UNet frozen, a ControlNet on c_r = E(I_ir) trained,
started from the joint UNet (its RGB branch and shared trunk), I_ir = SwinIR(degraded) by the frozen stage-0 model
inside the step.

  python -c "from diffbody_jax.config import load_config as c; print(c('stage1_controlnet:variant=tiny').phase)"

Variants (the members and sections of configs/stage1_joint_unet.py, plus the ControlNet and SwinIR):
  paper  the diffbody-v2-stage1 ControlNet (8 input channels: the RGB branch's noisy latent + pose latent; a
         4-channel latent condition), DiffBIR's SwinIR; 100,000 steps, batch 64, Adam lr 1e-5 (Sec. 4.2). Sources:
           --config.train.init_from="joint_unet=RUNS/joint,controlnet=unet:RUNS/joint,vae=SD21/vae,
             text_encoder=SD21/text_encoder,swinir=RUNS/swinir"
         (RUNS/joint a stage1_joint_unet run, RUNS/swinir a stage-0 run: their export/ folders are read)
  tiny   tiny-v2-stage1 ControlNet and tiny SwinIR beside the tiny stage-1 members
"""

import pathlib

import ml_collections

from diffbody_jax.config import load_config, parse_arg

HERE = pathlib.Path(__file__).parent
VARIANTS = {"paper": ("diffbody-v2-stage1", "diffbir"), "tiny": ("tiny-v2-stage1", "tiny-diffbir")}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"unknown stage-1 variant {arg['variant']!r}; known: {sorted(VARIANTS)}")
    controlnet, swinir = VARIANTS[arg["variant"]]
    config = ml_collections.ConfigDict(load_config(f"{HERE / 'stage1_joint_unet.py'}:variant={arg['variant']}")
                                       .to_dict())
    config.model.members.controlnet = load_config(f"{HERE / 'controlnet.py'}:variant={controlnet}").model
    config.model.members.swinir = load_config(f"{HERE / 'swinir.py'}:variant={swinir}").model
    config.phase = "stage1_controlnet"
    config.lock()
    return config
