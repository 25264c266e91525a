"""UNet architectures: the real SD2.1 / SDXL configs and tiny variants for tests and demos.

  python -c "from diffbody_jax.config import load_config as c; print(c('unet', ['model.dtype=bfloat16']))"

(bench/unet_forward.py --variants sd21-base times the real SD2.1-base UNet)

Variants:
  sd21-base, sd21-768v, sdxl-base   configs/diffusers/<variant>/unet/config.json (the official files)
  tiny-sd21   SD2.1 layout (linear projections, 3 cross-attn levels then a plain one) at 32-64 channels;
              heads differ from head dims (2 heads of 16, 4 of 16) to catch diffusers' naming quirk
  tiny-sdxl   SDXL layout: plain first level, text_time embedding, transformer depths 1 and 2
  mid-sd21    SD2.1 layout at 128-512 channels (142M params): a benchmark size between tiny and real
  tiny-cond   9 input channels (z_t + conditions), 1x1-conv projections, upcast attention, per-block
              layers, flip_sin_to_cos off and freq_shift 1: the less common switches
"""

import json
import pathlib

import ml_collections

from diffbody_jax.config import model_section, parse_arg

DIFFUSERS_DIR = pathlib.Path(__file__).parent / "diffusers"

TINY = {
    "tiny-sd21": dict(
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=24,
        layers_per_block=1,
        norm_num_groups=8,
        use_linear_projection=True,
        sample_size=16,
    ),
    "tiny-sdxl": dict(
        block_out_channels=[32, 64, 96],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[1, 2, 3],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=32,
        layers_per_block=2,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        sample_size=16,
    ),
    "tiny-cond": dict(
        in_channels=9,
        block_out_channels=[32, 48, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[4, 2, 2],
        cross_attention_dim=16,
        layers_per_block=[1, 2, 1],
        norm_num_groups=16,
        use_linear_projection=False,
        upcast_attention=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        sample_size=12,
    ),
}
TINY["mid-sd21"] = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[2, 4, 8, 8],
    cross_attention_dim=768,
    layers_per_block=2,
    use_linear_projection=True,
    sample_size=32,
)
REAL = ("sd21-base", "sd21-768v", "sdxl-base")


def diffusers_config(variant: str) -> dict:
    """The diffusers config.json dict of a variant."""
    if variant in TINY:
        return dict(TINY[variant])
    if variant in REAL:
        return json.loads((DIFFUSERS_DIR / variant / "unet" / "config.json").read_text())
    raise ValueError(f"unknown UNet variant {variant!r}; known: {sorted(TINY) + list(REAL)}")


def get_config(arg=None):
    arg = parse_arg(arg, variant="sd21-base")
    config = ml_collections.ConfigDict()
    config.model = model_section(name="unet", variant=arg["variant"], diffusers=diffusers_config(arg["variant"]))
    config.lock()
    return config
