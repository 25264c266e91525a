"""VAE (AutoencoderKL) architectures: the real SD2.1 / SDXL configs and tiny variants for tests.

  python -c "from diffbody_jax.config import load_config; print(load_config('configs/vae.py:variant=tiny'))"

Variants:
  sd21-base, sdxl-base     configs/diffusers/<variant>/vae/config.json (official files)
  sdxl-vae-fp16-fix        the community SDXL VAE re-trained to stay inside fp16's range
  tiny      2 levels (32, 64 channels), 1 ResNet per level
  tiny4     4 levels (8, 16, 16, 32 channels): latents at 1/8 like SD's, for the tiny stage-2 ControlNet
  tiny3     3 levels, 2 ResNets per level, with a shift_factor (as SD3/Flux-style VAEs have)
"""

import json
import pathlib

import ml_collections

from diffbody_jax.config import parse_arg

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
}
REAL = ("sd21-base", "sdxl-base", "sdxl-vae-fp16-fix")


def diffusers_config(variant: str) -> dict:
    if variant in TINY:
        return dict(TINY[variant])
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
    config.lock()
    return config
