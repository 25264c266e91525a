"""VAE (AutoencoderKL) architectures: the real SD2.1 / SDXL configs and tiny variants; and the autoencoder phase
that trains them (the first phase of a pretrained base, diffbody_jax/training/phases.py).

  python -c "from diffbody_jax.config import load_config; print(load_config('configs/vae.py:variant=tiny').autoencoder)"

Trained like every phase: diffbody train --config configs/vae.py:variant=tiny --workdir runs/vae
--config.data.manifest=data/sample/manifest.jsonl. The loss is the LDM autoencoder's L1 reconstruction + KL
(autoencoder.kl_weight) without its perceptual (LPIPS) and GAN terms: sharper decodes need those, which no
offline weights here provide. A tiny variant trains every param from scratch and its export carries
scaling_factor = 1 / std of its latents over autoencoder.calibrate_batches training batches; a real variant
fine-tunes SD's decoder only on your photos (autoencoder.trainable=decoder, as SD's ft-EMA / ft-MSE VAEs were
made), so the latents every UNet was trained on, and the scaling factor, stay. Start it from the downloaded VAE:
--config.train.init_from=SD21/vae.

Variants:
  sd21-base, sdxl-base     configs/diffusers/<variant>/vae/config.json (official files)
  sdxl-vae-fp16-fix        the community SDXL VAE re-trained to stay inside fp16's range
  tiny      2 levels (32, 64 channels), 1 ResNet per level
  tiny4     4 levels (8, 16, 16, 32 channels): latents at 1/8 like SD's, for the tiny stage-2 ControlNet
  tiny3     3 levels, 2 ResNets per level, with a shift_factor (as SD3/Flux-style VAEs have)
  zoo       3 levels (16, 32, 64 channels): latents at 1/4, the tiny zoo's VAE (docs/zoo.md): at 64 px it keeps
            16 x 16 x 4 numbers, more than a x4-downsampled input carries, and its UNets train 5x faster than on
            tiny's 32 x 32 latents
"""

import json
import pathlib

import ml_collections

from diffbody_jax.config import parse_arg, training_sections

DIFFUSERS_DIR = pathlib.Path(__file__).parent / "diffusers"

TINY = {
    "tiny": dict(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    ),
    "tiny4": dict(
        block_out_channels=[8, 16, 16, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    ),
    "tiny3": dict(
        block_out_channels=[16, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=2,
        norm_num_groups=8,
        latent_channels=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        sample_size=32,
    ),
    "zoo": dict(
        block_out_channels=[16, 32, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    ),
}
REAL = ("sd21-base", "sdxl-base", "sdxl-vae-fp16-fix")


def diffusers_config(variant: str) -> dict:
    if variant in TINY:  # every VAEConfig field, so that any (e.g. a trained scaling_factor) can be overridden
        import dataclasses

        from diffbody_jax.models.vae import VAEConfig

        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(VAEConfig()).items()}
        return {**defaults, **TINY[variant]}
    if variant in REAL:
        return json.loads((DIFFUSERS_DIR / variant / "vae" / "config.json").read_text())
    raise ValueError(f"unknown VAE variant {variant!r}; known: {sorted(TINY) + list(REAL)}")


def get_config(arg=None):
    arg = parse_arg(arg, variant="sd21-base")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            name="vae",
            variant=arg["variant"],
            diffusers=diffusers_config(arg["variant"]),
            dtype="float32",
            param_dtype="float32",
            attention_backend="einsum",
            decode_tile=64,  # latent pixels; tiled decode above this size
            decode_overlap=16,
        )
    )
    config.phase = "autoencoder"
    tiny = arg["variant"] in TINY
    config.autoencoder = ml_collections.ConfigDict(dict(
        trainable="all" if tiny else "decoder",  # all | decoder (decoder and post_quant_conv)
        kl_weight=1e-6,  # LDM's KL weight, relative to per-image sums (training.losses.autoencoder_loss)
        calibrate_batches=8,  # training batches that measure the exported scaling_factor (all: 0 keeps it)
    ))
    if tiny:  # the tiny zoo's autoencoders: from scratch on 64 x 64 crops, minutes on a CPU
        training_sections(config, steps=2000, batch_size=8, learning_rate=1e-3,
                          **{"data.buckets": [[64, 64]], "train.log_every": 50, "checkpoint.every": 500})
    else:  # ours (no paper trains the VAE), to be set for your data: a gentle decoder fine-tune
        training_sections(config, steps=50_000, batch_size=16, learning_rate=1e-5, **{"train.ema_decay": 0.999})
    config.lock()
    return config
