"""DiffBody v2 stage 2, Eq. 4 (seed 002): the colour adapter (Resampler + every to_k_ip / to_v_ip) trained from
IP-Adapter-Plus-XL's weights on CLIP ViT-H/14 features, the SDXL UNet and the trained prior-fusion ControlNet frozen.

  python -c "from diffbody_jax.config import load_config as c; print(c('colour_adapter:variant=tiny').phase)"

Variants (configs/stage2_controlnet.py's group plus the CLIP image encoder):
  paper  200,000 steps, batch 64, Adam lr 1e-4 (Sec. 4.2). Sources:
           --config.train.init_from="stage2/unet=SDXL/unet,stage2/controlnet=RUNS/stage2_controlnet,
             stage2=IPA,image_encoder=IPA_ENCODER,vae=SDXL/vae,text_encoder=SDXL/text_encoder,
             text_encoder_2=SDXL/text_encoder_2,swinir=RUNS/swinir"
         (IPA: `diffbody convert ip-adapter-to-flax` of ip-adapter-plus_sdxl_vit-h.bin: it fills the Resampler and
         the UNet's adapter kernels; IPA_ENCODER: IP-Adapter's models/image_encoder folder)
  tiny   the tiny group of configs/stage2_controlnet.py and a tiny vision tower

The paper feeds CLIP features of I_res (stage 1's restoration). A training step has no I_res (it needs a stage-1
sampling run per example); adapter.image picks the stand-in: "ir" (default: SwinIR's restoration, the closest to
I_res) or "target" (the clean crop, as IP-Adapter itself was trained). The export is IP-Adapter's own layout
(ip_adapter.safetensors, image_proj + ip_adapter), which diffusers' load_ip_adapter reads.
"""

import pathlib

import ml_collections

from diffbody_jax.config import at_scale, load_config, member_sections, parse_arg

HERE = pathlib.Path(__file__).parent
# the member added to configs/stage2_controlnet.py's group
MEMBERS = {"paper": dict(image_encoder="clip:variant=ip-adapter"),
           "tiny": dict(image_encoder="clip:variant=tiny-vision")}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    added = member_sections(MEMBERS, arg["variant"], "configs/colour_adapter.py")
    config = ml_collections.ConfigDict(load_config(f"{HERE / 'stage2_controlnet.py'}:variant={arg['variant']}")
                                       .to_dict())
    config.model.members.update(added)
    if arg["variant"] != "tiny":
        at_scale(config.model)  # the added image encoder too: docs/scaling.md
    config.phase = "colour_adapter"
    if arg["variant"] != "tiny":
        config.train.steps, config.data.batch_size, config.optim.learning_rate = 200_000, 64, 1e-4
        config.train.grad_accum = 1
    config.lock()
    return config
