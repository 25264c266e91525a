"""DiffBody v2 stage 2's denoiser: SDXL UNet + prior-fusion ControlNet + colour adapter (diffbody_jax/models/stage2.py).

  diffbody convert init-from-controlnet --controlnet controlnet-sdxl-tiny \\
      --config configs/controlnet.py:variant=tiny-v2-stage2 --dst ckpt/controlnet-stage2
  diffbody convert ip-adapter-to-flax --src ip-adapter-tiny.bin --unet-config configs/unet.py:variant=tiny-sdxl \\
      --dst ckpt/colour-adapter

(with the real files: any diffusers SDXL ControlNet folder and variant=diffbody-v2-stage2 (the default);
ip-adapter-plus_sdxl_vit-h.bin with the default --unet-config, SDXL-base)

Variants:
  sdxl   SDXL-base UNet, configs/controlnet.py:diffbody-v2-stage2, IP-Adapter-Plus-XL's Resampler (16 queries,
         width 1280, 4 layers of 20 heads of 64, ViT-H/14 features of width 1280 in, 2048 out)
  tiny   the tiny-sdxl UNet, tiny-v2-stage2 ControlNet and a tiny Resampler (CLIP width 24), for tests and demos
Its two training phases, with the encoders they run in the step, are configs/stage2_controlnet.py (Eq. 3) and
configs/colour_adapter.py (Eq. 4).
"""


import ml_collections

from diffbody_jax.config import load_config, model_section, parse_arg

# sdxl's Resampler is ResamplerConfig's defaults; the tiny one keeps head dim 64, depth 4 and feed-forward x4,
# which diffusers' IP-Adapter converter assumes. The Resampler's output_dims is always the UNet's cross-attention
# width.
TINY_RESAMPLER = dict(embed_dims=24, hidden_dims=128, depth=4, dim_head=64, heads=2, num_queries=4, ffn_ratio=4)
VARIANTS = {
    "sdxl": dict(unet="unet:variant=sdxl-base", controlnet="controlnet:variant=diffbody-v2-stage2", resampler={}),
    "tiny": dict(unet="unet:variant=tiny-sdxl", controlnet="controlnet:variant=tiny-v2-stage2",
                 resampler=TINY_RESAMPLER),
}


def get_config(arg=None):
    from diffbody_jax.models.ip_adapter import ResamplerConfig

    arg = parse_arg(arg, variant="sdxl")
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"configs/stage2.py: unknown variant {arg['variant']!r}; known: {sorted(VARIANTS)}")
    variant = VARIANTS[arg["variant"]]
    unet = load_config(variant["unet"]).model.diffusers.to_dict()
    controlnet = load_config(variant["controlnet"]).model.diffusers.to_dict()
    resampler = ResamplerConfig(**variant["resampler"], output_dims=unet["cross_attention_dim"]).to_dict()
    config = ml_collections.ConfigDict()
    config.model = model_section(name="stage2", variant=arg["variant"], unet=unet, controlnet=controlnet,
                                 resampler=resampler)
    config.lock()
    return config
