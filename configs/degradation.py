"""Degradations that make (degraded, clean) training pairs and the paper's evaluation inputs.

  python -c "from diffbody_jax.config import load_config as c; print(c('configs/degradation.py'))"

kind:
  real-esrgan                  Real-ESRGAN's second-order pipeline with its published ranges (training)
  blur2-down4, noise40-down4, blur2-noise40, blur2-noise40-down4, blur2-noise20-down4-jpeg50
                               the five fixed mixtures of Table 1 (DiffBody v2), applied in the listed order

Table 1 gives neither the blur kernel size nor the order of the operations; ours are stated here and in
`diffbody_jax.data.degradations`: a 13x13 Gaussian kernel for sigma = 2 (2 * ceil(3 sigma) + 1) and the
classical model's order, y = JPEG((x * k) down_4 + n): blur -> bicubic x4 downsample -> Gaussian noise (sigma
on 0-255, added at low resolution) -> JPEG. Every mixture ends with
8-bit quantisation; the restorer sees the bicubic upsampling back to the clean size.
"""

import dataclasses

import ml_collections

from diffbody_jax.config import parse_arg
from diffbody_jax.data.degradations import TABLE1_MIXTURES, RealESRGANConfig


def get_config(arg=None):
    arg = parse_arg(arg, kind="real-esrgan")
    if arg["kind"] != "real-esrgan" and arg["kind"] not in TABLE1_MIXTURES:
        raise ValueError(f"unknown degradation kind {arg['kind']!r}; known: real-esrgan, {sorted(TABLE1_MIXTURES)}")
    config = ml_collections.ConfigDict()
    config.kind = arg["kind"]
    config.real_esrgan = ml_collections.ConfigDict(dataclasses.asdict(RealESRGANConfig()))
    config.mixtures = ml_collections.ConfigDict({name: {"ops": ops} for name, ops in TABLE1_MIXTURES.items()})
    return config
