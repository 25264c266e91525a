"""The body-part network (BPBreID on HRNet-W32) of DiffBody v1: its attention map I_attn and the part features of
part-loss guidance (whose settings are v1's: configs/v1_controlnet.py, section guidance).

  diffbody convert bodypart-to-flax --src bpbreid-tiny.pth.tar --config configs/bodypart.py:variant=tiny \
      --dst ckpt/bodypart

(with the published model: --src bpbreid_market1501_hrnet32_10642.pth and variant=bpbreid, the default)

Variants (model.bodypart: fields of models/bodypart.py's BodyPartConfig; the checkpoint's own head (parts, width,
identities) is read from the file when converting):
  bpbreid   the published model, BodyPartConfig's defaults: HRNet-W32 with the incre head (1920-channel map at 1/4
            resolution), K = 5 parts + background, gwap part pooling, 512-d embeddings reduced after pooling,
            384 x 128 input
  tiny      a small HRNet (widths 8-32, TINY_HRNET), 32-d embeddings, 64 x 32 input: tests and the demo

It is also the body-part phase's config (training/phases.py "bodypart"): the pixel classifier learns part labels
drawn from the manifest's keypoints (data/body_parts.py; data.maps=["parts"]) by cross-entropy with label
smoothing (parts.label_smoothing, BPBreID's 0.1); the identity losses of BPBreID are not trained (no identities):
diffbody train --config configs/bodypart.py:variant=tiny --workdir runs/bodypart
--config.data.manifest=data/sample/manifest.jsonl (tests/training/test_bodypart_phase.py runs it). The tiny
variant trains from scratch; bpbreid fine-tunes the published model on your people
(--config.train.init_from=bpbreid_market1501_hrnet32_10642.pth). BatchNorm keeps its stored statistics (frozen,
as everywhere in DiffBody): a fresh network's are (0, 1), which makes its BatchNorms affine layers.
"""

import ml_collections

from diffbody_jax.config import parse_arg, training_sections

# A small HRNet for tests (HRNetConfig fields): the stages of W32 with one or two blocks and 8-32 channels.
TINY_HRNET = dict(
    stem_width=16,
    layer1_blocks=1,
    layer1_channels=8,
    stages=(dict(num_modules=1, num_blocks=(1, 1), num_channels=(8, 16)),
            dict(num_modules=2, num_blocks=(1, 1, 2), num_channels=(8, 16, 24)),
            dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 24, 32))),
    incre_planes=(8, 16, 16, 16),
)

VARIANTS = {
    "bpbreid": dict(),
    "tiny": dict(hrnet=TINY_HRNET, embed_dim=32, input_size=(64, 32)),
}


def get_config(arg=None):
    from diffbody_jax.models.bodypart import BodyPartConfig

    arg = parse_arg(arg, variant="bpbreid")
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"unknown body-part network variant {arg['variant']!r}; known: {sorted(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        name="bodypart",
        variant=arg["variant"],
        bodypart=BodyPartConfig.from_dict(VARIANTS[arg["variant"]], f"bodypart:variant={arg['variant']}").to_dict(),
    ))
    config.phase = "bodypart"
    config.parts = ml_collections.ConfigDict(dict(label_smoothing=0.1))
    if arg["variant"] == "tiny":
        training_sections(config, steps=1000, batch_size=8, learning_rate=1e-3,
                          **{"data.buckets": [[64, 64]], "data.maps": ["parts"], "train.log_every": 50,
                             "checkpoint.every": 500})
    else:  # ours: BPBreID's own training is on Market-1501 identities, which this phase does not use
        training_sections(config, steps=20_000, batch_size=32, learning_rate=1e-4,
                          **{"data.buckets": [[384, 128]], "data.maps": ["parts"]})
    config.lock()
    return config
