"""A zoo's held-out photos as the demo restores and scores them.

    inputs = held_out_inputs(read_manifest("zoo/data/held_out.jsonl"), size=64, seed=0)
    write_held_out(out, inputs)                      # OUT/clean, OUT/degraded, OUT/keypoints.jsonl
    ...                                              # restore OUT/degraded into OUT/v1, OUT/v2, OUT/swinir
    scores = score_pngs(out, [x.name for x in inputs], ("degraded", "swinir", "v1", "v2"))

The clean photo is the held-out photo's central square scaled (area) to `size` x `size`: exactly the demo's square
bucket, so restoring it resamples nothing (a photo of another shape would be scaled into the bucket and back, which
blurs what is scored); the degraded one is the seeded
Real-ESRGAN degradation of it, brought back to its size, as the training pipeline degrades (`data.degradations`).
Both are quantised to 8 bits, as written. Scores are scikit-image's PSNR and SSIM on the written RGB PNGs (the
issue's yardstick; `evaluation.metrics` scores arrays on luma and RGB for `diffbody eval`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffbody_jax.config import load_config
from diffbody_jax.data.degradations import degradation_from_config, resize
from diffbody_jax.data.pose import as_persons, transform_keypoints
from diffbody_jax.pipelines.image_io import read_photo, to_uint8, write_png


@dataclasses.dataclass(frozen=True)
class HeldOut:
    name: str
    clean: np.ndarray  # [H, W, 3] float32 in [0, 1] (held_out_inputs: on the 8-bit grid)
    degraded: np.ndarray  # [H, W, 3] likewise
    keypoints: np.ndarray  # [P, K, 3] in the clean photo's pixels
    keypoint_format: str
    caption: str


def _quantised(image: np.ndarray) -> np.ndarray:
    return to_uint8(image).astype(np.float32) / 255.0


def central_square(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square of an (H, W) image."""
    h, w = shape
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side


def held_out_inputs(records, size: int, seed: int, degradation: str = "real-esrgan") -> list[HeldOut]:
    """Per manifest record: the clean photo at `size`, its degraded copy (numpy generator [seed, index]) and its
    keypoints moved into the clean photo's pixels. `degradation`: a kind of `configs/degradation.py` (real-esrgan,
    the one every zoo phase trains on, or a Table 1 mixture's name)."""
    degrade = degradation_from_config(load_config(f"degradation:kind={degradation}"))
    if size % degrade.scale:
        raise ValueError(f"size={size}: must be a multiple of the degradation {degradation!r}'s scale {degrade.scale}")
    out = []
    for n, record in enumerate(records):
        photo = read_photo(record.image).pixels
        top, left, side = central_square(photo.shape[:2])
        clean = _quantised(resize(photo[top: top + side, left: left + side], (size, size), "area"))
        degraded = _quantised(degrade(clean, np.random.default_rng([seed, n])).upsampled)
        kp = transform_keypoints(as_persons(record.keypoints, record.keypoint_format),
                                 (size / side, size / side), (top * size / side, left * size / side))
        out.append(HeldOut(Path(record.image).stem, clean, degraded, kp, record.keypoint_format, record.caption))
    return out


def write_held_out(out: Path, inputs: Sequence[HeldOut]) -> None:
    """OUT/clean/<name>.png, OUT/degraded/<name>.png and OUT/keypoints.jsonl (the degraded photos' keypoints, what
    `diffbody restore --keypoints` reads)."""
    lines = []
    for x in inputs:
        write_png(out / "clean" / f"{x.name}.png", x.clean, overwrite=True)
        write_png(out / "degraded" / f"{x.name}.png", x.degraded, overwrite=True)
        keypoints = np.round(x.keypoints.astype(np.float64), 2).tolist()
        lines.append(json.dumps({"image": f"degraded/{x.name}.png", "caption": x.caption, "keypoints": keypoints,
                                 "keypoint_format": x.keypoint_format}))
    (out / "keypoints.jsonl").write_text("\n".join(lines) + "\n")


def score_pngs(out: Path, names: Sequence[str], versions: Sequence[str]) -> dict:
    """{"per_photo": {name: {version: {"psnr", "ssim"}}}, "mean": {version: {...}}}: OUT/<version>/<name>.png
    against OUT/clean/<name>.png, RGB, by scikit-image (data range 255, SSIM over the colour axis)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def load(path: Path) -> np.ndarray:
        return to_uint8(read_photo(path, min_size=1).pixels)

    per_photo = {}
    for name in names:
        clean = load(out / "clean" / f"{name}.png")
        row = {}
        for version in versions:
            image = load(out / version / f"{name}.png")
            if image.shape != clean.shape:
                raise ValueError(f"{out / version / f'{name}.png'}: {image.shape}, clean is {clean.shape}")
            row[version] = {"psnr": float(peak_signal_noise_ratio(clean, image, data_range=255)),
                            "ssim": float(structural_similarity(clean, image, channel_axis=-1, data_range=255))}
        per_photo[name] = row
    mean = {v: {k: float(np.mean([per_photo[n][v][k] for n in names])) for k in ("psnr", "ssim")} for v in versions}
    return {"per_photo": per_photo, "mean": mean}
