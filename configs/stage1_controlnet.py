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

from diffbody_jax.config import at_scale, load_config, member_sections, parse_arg

HERE = pathlib.Path(__file__).parent
# the members added to configs/stage1_joint_unet.py's group
MEMBERS = {
    "paper": dict(controlnet="controlnet:variant=diffbody-v2-stage1", swinir="swinir:variant=diffbir"),
    "tiny": dict(controlnet="controlnet:variant=tiny-v2-stage1", swinir="swinir:variant=tiny-diffbir"),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    added = member_sections(MEMBERS, arg["variant"], "configs/stage1_controlnet.py")
    config = ml_collections.ConfigDict(load_config(f"{HERE / 'stage1_joint_unet.py'}:variant={arg['variant']}")
                                       .to_dict())
    config.model.members.update(added)
    if arg["variant"] != "tiny":
        at_scale(config.model)  # the added members too: docs/scaling.md
    config.phase = "stage1_controlnet"
    config.lock()
    return config
