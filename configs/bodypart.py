"""The body-part network (BPBreID on HRNet-W32) and part-loss guidance of DiffBody v1.

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
    config.diffusion = ml_collections.ConfigDict(dict(
        # Eq. 6: the distance between part features and how parts are weighted (diffusion/part_guidance.py).
        part_loss=dict(distance="ce", temperature=1.0, visibility="none"),
        # Algorithm 1's gradient scale s and window, in SamplerConfig's terms. The paper gives no value for s:
        # it depends on the loss and latent scales, so tune it on a few validation images.
        guidance=dict(scale=1.0, start=1.0, end=0.0, schedule="constant"),
    ))
    config.lock()
    return config
