"""evaluation/held_out.py: the demo's held-out photos land where their keypoints say, and the scores are PSNR on the
written PNGs as the float64 formula gives it."""

import json

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.evaluation.held_out import held_out_inputs, score_pngs, write_held_out

pytest.importorskip("skimage.metrics")


def _portrait(tmp_path, rng, hw=(300, 240)):
    """A tall photo, dark but for one bright dot at a random keypoint, in a one-line manifest."""
    image = np.full((*hw, 3), 20, np.uint8)
    y, x = rng.integers(80, hw[0] - 80), rng.integers(20, hw[1] - 20)
    image[y - 6: y + 7, x - 6: x + 7] = 250
    Image.fromarray(image).save(tmp_path / "portrait.png")
    keypoints = np.zeros((17, 3))
    keypoints[0] = (x, y, 1.0)
    (tmp_path / "held_out.jsonl").write_text(json.dumps({
        "image": "portrait.png", "caption": "a person", "keypoints": keypoints.tolist(), "keypoint_format": "coco17"}))
    return read_manifest(tmp_path / "held_out.jsonl")


def test_clean_photo_is_the_central_square_with_its_keypoints_on_their_pixels(tmp_path, rng):
    records = _portrait(tmp_path, rng)
    (x,) = held_out_inputs(records, size=64, seed=0)
    assert x.clean.shape == x.degraded.shape == (64, 64, 3) and x.name == "portrait"
    brightest = np.unravel_index(np.argmax(x.clean.sum(-1)), (64, 64))
    kx, ky = x.keypoints[0, 0, :2]
    assert abs(brightest[0] - ky) <= 1.5 and abs(brightest[1] - kx) <= 1.5
    # the degradation is seeded: equal seeds equal inputs, another seed another one
    assert np.array_equal(held_out_inputs(records, 64, 0)[0].degraded, x.degraded)
    assert not np.array_equal(held_out_inputs(records, 64, 1)[0].degraded, x.degraded)
    with pytest.raises(ValueError, match="size=62"):
        held_out_inputs(records, size=62, seed=0)


def test_a_table1_mixture_degrades_the_same_clean_photo(tmp_path, rng):
    records = _portrait(tmp_path, rng)
    Image.fromarray(np.full((300, 240, 3), 128, np.uint8)).save(tmp_path / "portrait.png")  # no clipping of the noise
    (esrgan,) = held_out_inputs(records, size=64, seed=3)
    (noisy,) = held_out_inputs(records, size=64, seed=3, degradation="blur2-noise40")
    assert np.array_equal(noisy.clean, esrgan.clean)
    # blur2-noise40 keeps the size: its input is the blurred clean photo plus sigma-40 noise on the 8-bit grid
    residual = (noisy.degraded - noisy.clean) * 255
    assert abs(residual.std() - 40) < 3 and abs(residual.mean()) < 3, (residual.std(), residual.mean())
    assert np.std(esrgan.degraded - esrgan.clean) * 255 < 25  # not that noise
    assert held_out_inputs(records, size=62, seed=0, degradation="blur2-noise40")[0].clean.shape == (62, 62, 3)
    with pytest.raises(ValueError, match="size=62.*blur2-down4.*4"):
        held_out_inputs(records, size=62, seed=0, degradation="blur2-down4")


def test_scores_are_psnr_of_the_written_pngs(tmp_path, rng):
    inputs = held_out_inputs(_portrait(tmp_path, rng), size=64, seed=0)
    out = tmp_path / "demo"
    write_held_out(out, inputs)
    (out / "v1").mkdir()
    noisy = np.clip(inputs[0].clean + rng.normal(0, 0.05, inputs[0].clean.shape), 0, 1)
    Image.fromarray(np.round(noisy * 255).astype(np.uint8)).save(out / "v1" / "portrait.png")
    scores = score_pngs(out, ["portrait"], ("degraded", "v1"))
    clean = np.asarray(Image.open(out / "clean" / "portrait.png"), np.float64)
    for version in ("degraded", "v1"):
        image = np.asarray(Image.open(out / version / "portrait.png"), np.float64)
        expected = 10 * np.log10(255.0 ** 2 / np.mean((image - clean) ** 2))
        assert abs(scores["per_photo"]["portrait"][version]["psnr"] - expected) < 1e-6
    Image.fromarray(np.zeros((64, 60, 3), np.uint8)).save(out / "v1" / "portrait.png")
    with pytest.raises(ValueError, match=r"v1/portrait\.png: \(64, 60, 3\)"):
        score_pngs(out, ["portrait"], ("v1",))
