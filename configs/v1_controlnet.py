"""DiffBody v1 (seed 000): a ControlNet on a frozen SD2.1-base, conditioned on [E(I_reg), E(I_pose), I_attn].

  python -c "from diffbody_jax.config import load_config as c; print(c('configs/v1_controlnet.py:variant=tiny').train)"

Trained like every phase: diffbody train --config configs/v1_controlnet.py:variant=tiny --workdir runs/v1
--config.data.manifest=data/sample/manifest.jsonl (tests/training/test_v1_controlnet.py runs it).

Variants:
  paper  SD2.1-base UNet, VAE and text encoder (configs/diffusers/sd21-base), the diffbody-v1 ControlNet (latent
         condition of 4 + 4 + 1 channels), DiffBIR's SwinIR for I_reg, BPBreID for I_attn; the paper's numbers
         (seed 000, Sec. 4): 10,000 steps, batch 128, Adam lr 1e-4, 1024 x 512 (H x W) crops. Set the sources:
           --config.train.init_from="unet=SD21/unet,vae=SD21/vae,text_encoder=SD21/text_encoder,
             controlnet=unet:SD21/unet,swinir=RUNS/swinir,bodypart=bpbreid_market1501_hrnet32_10642.pth"
         (SD21 a stable-diffusion-2-1-base folder; RUNS/swinir a stage-0 run, whose export/ is read)
  tiny   the tiny-sd21 UNet and tiny-v1 ControlNet, the tiny VAE (latents at 1/2), a 2-layer CLIP text encoder,
         tiny SwinIR and body-part networks; 64 x 64 crops: seconds on a CPU
  mid    mid-sd21 (142M) UNet and its v1 ControlNet, the tiny4 VAE (latents at 1/8), a 2-layer 768-wide text encoder,
         the tiny SwinIR and body-part networks: the mid-size preset of bench/restore.py

Everything but the ControlNet is frozen. I_reg = SwinIR(degraded) and I_attn = Attn(I_reg) are computed inside
the train step by the frozen stage-0 and part networks, as Eq. 3 writes (diffusion.attention=manifest reads the
manifest's precomputed attention map instead). Loss: Eq. 4 with the attention weight inside the square
(diffusion.weighting=linear: outside it). Captions come from the manifest (text.fallback for empty ones; drop
them with text.drop_prob to train for classifier-free guidance).
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
    "paper": dict(unet="unet:variant=sd21-base", controlnet="controlnet:variant=diffbody-v1",
                  vae="vae:variant=sd21-base", text_encoder="clip:variant=sd21-base", swinir="swinir:variant=diffbir",
                  bodypart="bodypart:variant=bpbreid"),
    "tiny": dict(unet="unet:variant=tiny-sd21", controlnet="controlnet:variant=tiny-v1", vae="vae:variant=tiny",
                 text_encoder="clip:variant=tiny", swinir="swinir:variant=tiny-diffbir",
                 bodypart="bodypart:variant=tiny"),
    "mid": dict(unet="unet:variant=mid-sd21", controlnet="controlnet:variant=mid-v1", vae="vae:variant=tiny4",
                text_encoder="clip:variant=mid", swinir="swinir:variant=tiny-diffbir",
                bodypart="bodypart:variant=tiny"),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="paper")
    tiny = arg["variant"] in ("tiny", "mid")
    config = ml_collections.ConfigDict()
    config.model = group_section(MEMBERS, arg["variant"], "configs/v1_controlnet.py")
    config.phase = "v1_controlnet"
    config.diffusion = ml_collections.ConfigDict(dict(
        scheduler="sd21-base",  # configs/diffusers/<name>/scheduler: the noise schedule of the frozen UNet
        prediction_type="epsilon",
        weighting="squared",  # Eq. 4 as written: ((1 + I_attn)(eps - eps_theta))^2; "linear": weight outside
        # I_attn: the part network in the step (Eq. 3); "manifest": the data's attention map; "mask": the data's
        # person mask (an approximation when no part network exists; add "attention" / "mask" to data.maps)
        attention="model",
    ))
    # Restoring's part-loss guidance (Algorithm 1, Eq. 6; diffusion/part_guidance.py): carried by the export's
    # contract.json to `diffbody restore --guidance S`. The paper gives no scale s (restore's --guidance), and names
    # cross-entropy between part features; the window and schedule are ours (whole trajectory, constant s).
    config.guidance = ml_collections.ConfigDict(dict(
        distance="ce", temperature=1.0, visibility="none", start=1.0, end=0.0, schedule="constant"))
    config.text = text_section("" if tiny else str(HERE / "diffusers/sd21-base/tokenizer"), "!")  # SD2.1 pads "!"
    if tiny:
        tiny_training_sections(config, ["pose"])
    else:
        training_sections(config, steps=10_000, batch_size=128, learning_rate=1e-4,
                          **{"data.buckets": [[1024, 512]], "data.maps": ["pose"]})
        at_scale(config.model)  # bf16 compute, remat, bounded attention: docs/scaling.md
    config.lock()
    return config
