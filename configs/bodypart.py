"""The body-part network (BPBreID on HRNet-W32) of DiffBody v1: its attention map I_attn and the part features of
part-loss guidance (whose settings are v1's: configs/v1_controlnet.py, section guidance).

  diffbody convert bodypart-to-flax --src bpbreid-tiny.pth.tar --config configs/bodypart.py:variant=tiny \
      --dst ckpt/bodypart

(with the published model: --src bpbreid_market1501_hrnet32_10642.pth and variant=bpbreid, the default)

Variants:
  bpbreid   the published model: HRNet-W32 with the incre head (1920-channel map at 1/4 resolution), K = 5
            parts + background, gwap part pooling, 512-d embeddings reduced after pooling, 384 x 128 input
  tiny      a small HRNet (widths 8-32), 32-d embeddings, 64 x 32 input: tests and the demo
"""

import ml_collections

from diffbody_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="bpbreid")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        name="bodypart",
        variant=arg["variant"],
        # Fields of BodyPartConfig to override; the checkpoint's own head (parts, width, identities) is read
        # from the file when converting.
        overrides=ml_collections.ConfigDict(dict(input_size=(384, 128) if arg["variant"] == "bpbreid" else (64, 32))),
    ))
    config.lock()
    return config
