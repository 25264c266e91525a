"""CLIP encoders as frozen members of the training phases: text encoders and the colour adapter's image encoder.

  python -c "from diffbody_jax.config import load_config as c; print(c('configs/clip.py:variant=tiny').model.name)"

Variants (model.transformers holds the transformers config.json):
  sd21-base         SD2.1-base's text encoder (OpenCLIP ViT-H text tower, 1024 wide, 23 layers)
  sdxl-base         SDXL-base's text_encoder (CLIP ViT-L text tower, 768 wide)
  sdxl-base-2       SDXL-base's text_encoder_2 (OpenCLIP bigG text tower with projection, 1280 wide)
  ip-adapter        IP-Adapter-Plus-XL's image encoder (CLIP ViT-H/14 vision tower, 1280 wide)
  tiny              a 2-layer text encoder 24 wide (the tiny SD2.1 UNet's cross-attention width)
  mid               a 2-layer text encoder 768 wide (mid-sd21's cross-attention width: bench/restore.py)
  tiny-sdxl, tiny-sdxl-2   two 2-layer text encoders 16 wide (the second with a 16-wide projection): together
                    the tiny SDXL UNet's 32-wide context and 16-wide pooled embedding
  tiny-vision       a 2-layer vision tower 24 wide on 32 x 32 pixels (the tiny Resampler's input width)
"""

import json
import pathlib

import ml_collections

from diffbody_jax.config import model_section, parse_arg

DIFFUSERS = pathlib.Path(__file__).parent / "diffusers"


def _text(hidden: int, projection: int, **extra) -> dict:
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0, **extra)


TINY = {
    "tiny": ("clip_text", _text(24, 24)),
    "mid": ("clip_text", _text(768, 768)),
    "tiny-sdxl": ("clip_text", _text(16, 16)),
    "tiny-sdxl-2": ("clip_text", _text(16, 16, architectures=["CLIPTextModelWithProjection"])),
    "tiny-vision": ("clip_vision", dict(hidden_size=24, intermediate_size=48, projection_dim=24, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, hidden_act="gelu")),
}
FILES = {
    "sd21-base": ("clip_text", "sd21-base/text_encoder"),
    "sdxl-base": ("clip_text", "sdxl-base/text_encoder"),
    "sdxl-base-2": ("clip_text", "sdxl-base/text_encoder_2"),
    "ip-adapter": ("clip_vision", "ip-adapter-image-encoder"),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="sd21-base")
    name = arg["variant"]
    if name in TINY:
        builder, transformers = TINY[name]
    elif name in FILES:
        builder, folder = FILES[name]
        transformers = json.loads((DIFFUSERS / folder / "config.json").read_text())
    else:
        raise ValueError(f"unknown CLIP variant {name!r}; known: {sorted(TINY) + sorted(FILES)}")
    config = ml_collections.ConfigDict()
    config.model = model_section(name=builder, variant=name, transformers=transformers)
    config.lock()
    return config
