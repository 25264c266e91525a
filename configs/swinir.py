"""SwinIR (stage 0) architectures: the paper's DiffBIR-style restorer, the official KAIR models, tiny variants.

  python -c "from diffbody_jax.config import load_config; print(load_config('configs/swinir.py:variant=tiny'))"

Variants (all take images in [0, 1]):
  diffbir          DiffBody's stage 0, as DiffBIR's general_swinir: embed 180, 8 RSTB x 6 layers, 6 heads,
                   window 8, mlp 2, pixel-unshuffle x8 in, nearest+conv x8 out (512 px runs at 64 inside)
  real-sr-x4-m     KAIR 003_realSwinIR-M_x4 (embed 180, 6 RSTB, nearest+conv x4)
  real-sr-x4-l     KAIR 003_realSwinIR-L_x4 (embed 240, 9 RSTB, '3conv' residuals)
  classical-sr-x4  KAIR 001_classicalSR_DF2K_s64w8_SwinIR-M_x4 (pixelshuffle)
  lightweight-x4   KAIR 002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4 (pixelshuffledirect)
  denoise          KAIR 004_grayDN / 005_colorDN (no upsampler, a residual of the input)
  tiny, tiny-diffbir  2 RSTB of 2 layers, embed 24, window 4: tests and the demo
"""

import ml_collections

from diffbody_jax.config import parse_arg, training_sections

_REAL_SR = dict(upscale=4, img_size=64, window_size=8, img_range=1.0, mlp_ratio=2, upsampler="nearest+conv")

VARIANTS = {
    "diffbir": dict(
        img_size=64, patch_size=1, in_chans=3, embed_dim=180, depths=[6] * 8, num_heads=[6] * 8, window_size=8,
        mlp_ratio=2, upscale=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
        unshuffle_scale=8,
    ),
    "real-sr-x4-m": dict(_REAL_SR, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, resi_connection="1conv"),
    "real-sr-x4-l": dict(_REAL_SR, embed_dim=240, depths=[6] * 9, num_heads=[8] * 9, resi_connection="3conv"),
    "classical-sr-x4": dict(
        upscale=4, img_size=64, window_size=8, img_range=1.0, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6,
        mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv",
    ),
    "lightweight-x4": dict(
        upscale=4, img_size=64, window_size=8, img_range=1.0, embed_dim=60, depths=[6] * 4, num_heads=[6] * 4,
        mlp_ratio=2, upsampler="pixelshuffledirect", resi_connection="1conv",
    ),
    "denoise": dict(
        upscale=1, img_size=128, window_size=8, img_range=1.0, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6,
        mlp_ratio=2, upsampler="", resi_connection="1conv",
    ),
    "tiny": dict(
        img_size=16, embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=4, mlp_ratio=2, upscale=2,
        upsampler="nearest+conv",
    ),
    "tiny-diffbir": dict(
        img_size=16, embed_dim=24, depths=[2, 2], num_heads=[2, 3], window_size=4, mlp_ratio=2, upscale=4,
        upsampler="nearest+conv", unshuffle_scale=4,
    ),
}


def _defaults() -> dict:
    import dataclasses

    from diffbody_jax.models.swinir import SwinIRConfig

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(SwinIRConfig()).items()}


def get_config(arg=None):
    arg = parse_arg(arg, variant="diffbir")
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"unknown SwinIR variant {arg['variant']!r}; known: {sorted(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            name="swinir",
            variant=arg["variant"],
            swinir={**_defaults(), **VARIANTS[arg["variant"]]},  # every SwinIRConfig field, overridable
            dtype="float32",
            param_dtype="float32",
            attention_backend="einsum",  # the window attention's backend (models/layers.py)
            remat="none",  # none | full | dots | dots_no_batch
        )
    )
    config.phase = "swinir"  # the paper trains stage 0 with an L2 loss against the clean image
    if arg["variant"].startswith("tiny"):  # seconds on a CPU: one 64 x 64 bucket the sample set fills
        training_sections(config, steps=200, batch_size=4, learning_rate=2e-3,
                          **{"data.buckets": [[64, 64]], "train.log_every": 10, "checkpoint.every": 50})
    else:  # neither paper gives stage 0's numbers: ours, to be set for your data
        training_sections(config, steps=100_000, batch_size=32, learning_rate=1e-4)
    config.lock()
    return config
