"""`diffbody eval` (evaluation/table1.py): given keypoints are in the ground truth's pixels and land where the bucket
puts them; the table's input row is scikit-image's PSNR / SSIM on the Y channel of the same arrays."""

import json

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.cli.main import main
from diffbody_jax.data.degradations import TABLE1_MIXTURES
from diffbody_jax.evaluation.table1 import evaluation_jobs
from diffbody_jax.pipelines.image_io import read_photo
from diffbody_jax.pipelines.jobs import PoseSource
from diffbody_jax.pipelines.restore import RestoreSettings

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")
GT_HW = (256, 128)  # twice the 128 x 64 bucket of --size 64


def _ground_truth(folder, rng):
    folder.mkdir()
    smooth = np.kron(rng.uniform(0, 1, (GT_HW[0] // 16, GT_HW[1] // 16, 3)), np.ones((16, 16, 1)))
    Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / "tall.png")
    return folder / "tall.png"


def _nose_only(x, y):
    keypoints = np.zeros((17, 3))
    keypoints[0] = (x, y, 1.0)
    return keypoints


def test_keypoints_of_a_large_ground_truth_land_where_the_bucket_puts_them(tmp_path, rng):
    photo = read_photo(_ground_truth(tmp_path / "gt", rng))
    x, y = rng.uniform(20, 100), rng.uniform(20, 230)
    poses = PoseSource(table={"tall": (_nose_only(x, y), "coco17")})
    settings = RestoreSettings(size=64)
    jobs, references = evaluation_jobs([photo], list(TABLE1_MIXTURES)[0], 0, settings, ["p"], poses, 0)
    (job,), (reference,) = jobs, references
    assert job.fitted.bucket == (128, 64) and reference.shape == (128, 64, 3)
    # the nose in bucket pixels: the GT scaled by 1/2 (pixel centres), the reference filling the bucket
    want = np.array([(x + 0.5) * 0.5 - 0.5, (y + 0.5) * 0.5 - 0.5])
    drawn = np.argwhere(job.pose.max(-1) > 0)
    assert len(drawn)
    centre = drawn.mean(0)[::-1]  # (x, y)
    assert np.abs(centre - want).max() <= 1.0, (centre, want)


def test_the_input_row_is_scikit_images_psnr_and_ssim_on_y(stand_in_weights, tmp_path, rng):
    gt = _ground_truth(tmp_path / "gt", rng)
    mixture = list(TABLE1_MIXTURES)[1]
    out = tmp_path / "eval"
    assert main(["eval", str(gt.parent), "--weights", str(stand_in_weights), "--out", str(out), "--mixtures", mixture,
                 "--size", "64", "--steps", "1", "--sampler", "ddim", "--annotator", "none", "--save-images",
                 "--quiet"]) == 0
    row = json.loads((out / "metrics.json").read_text())["per_photo"][mixture]["tall.png"]["degraded"]
    settings = RestoreSettings(size=64)
    (job,), (reference,) = evaluation_jobs([read_photo(gt)], mixture, 0, settings, ["p"], PoseSource(), 0)

    def y(image):
        return skimage_color.rgb2ycbcr(np.asarray(image, np.float64))[..., 0] / 255.0

    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(row["psnr"] - skimage_metrics.peak_signal_noise_ratio(y(reference), y(job.photo.pixels),
                                                                     data_range=1.0)) <= 1e-4
    assert abs(row["ssim"] - skimage_metrics.structural_similarity(y(reference), y(job.photo.pixels), **kw)) <= 1e-4
    # and on the 8-bit PNGs --save-images wrote
    saved = {name: np.asarray(Image.open(out / mixture / name / "tall.png"), np.float64) / 255.0
             for name in ("reference", "degraded")}
    on_pngs = skimage_metrics.peak_signal_noise_ratio(y(saved["reference"]), y(saved["degraded"]), data_range=1.0)
    assert abs(row["psnr"] - on_pngs) <= 0.05
