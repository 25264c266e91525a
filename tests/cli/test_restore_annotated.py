"""The restore path takes pose maps from an annotator run on I_reg: the annotator sees the photo's part of the
regressed image (no reflected border), and the restoration equals one given the pose map drawn by hand from the
annotator's keypoints moved into the bucket. v1 weights without the body-part network take I_attn from the person
mask (its intermediate `attention` is that mask), and refuse to load without an annotator."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffbody_jax.annotators import Annotation
from diffbody_jax.data.pose import render_pose
from diffbody_jax.pipelines.fit import fit_to_bucket
from diffbody_jax.pipelines.image_io import Photo
from diffbody_jax.pipelines.jobs import Job, run_jobs
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.stand_in import write_stand_in_weights

SETTINGS = RestoreSettings(version="v1", steps=1, size=64, square_only=True)
JOINTS = np.zeros((1, 17, 3), np.float32)
JOINTS[0, 0], JOINTS[0, 5], JOINTS[0, 6] = (20, 8, 0.9), (8, 24, 0.9), (30, 24, 0.9)  # in the photo's pixels


class Recorder:
    """An annotator that returns fixed keypoints and a box mask and keeps what it was shown."""

    def __init__(self):
        self.seen = []

    def __call__(self, image, name=None):
        self.seen.append(np.array(image))
        mask = np.zeros(image.shape[:2], np.float32)
        mask[4:40, 6:34] = 1.0
        return Annotation(JOINTS, image.shape[:2], mask=mask, backend="recorder")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_stand_in_weights(tmp_path_factory.mktemp("weights") / "w", seed=5, versions=("v1",))


def _job(rng, pose=None):
    pixels = rng.uniform(0, 1, (64, 40, 3)).astype(np.float32)  # 64 x 40 in a 64 x 64 bucket: a border each side
    fitted = fit_to_bucket(pixels, SETTINGS.buckets)
    return Job(Photo(Path("p.png"), pixels), fitted, pose, "a person", None)


def test_the_pose_comes_from_the_annotator_on_i_reg(weights, rng):
    recorder = Recorder()
    restorer = Restorer(weights, SETTINGS, annotator=recorder)
    job = _job(rng)
    top, left, h, w = job.fitted.inner
    assert left > 0 and (h, w) == (64, 40)
    (_, annotated), = run_jobs(restorer, [job], batch=1, seed=0)
    i_reg = restorer.regress(job.fitted.pixels[None])[0]
    np.testing.assert_allclose(recorder.seen[0], i_reg[top: top + h, left: left + w], atol=1e-6)

    moved = JOINTS.copy()
    moved[..., 0] += left
    drawn = render_pose(moved, "coco17", job.fitted.bucket).astype(np.float32) / 255.0
    # the same restorer (one compile): given pose maps are used as they are, the annotator is not asked
    (_, given), = run_jobs(restorer, [_job_like(job, drawn)], batch=1, seed=0)
    np.testing.assert_allclose(annotated["restored"], given["restored"], atol=1e-5)
    (_, black), = run_jobs(restorer, [_job_like(job, np.zeros_like(drawn))], batch=1, seed=0)
    assert len(recorder.seen) == 1  # only the job without a pose map was annotated
    assert np.abs(black["restored"] - given["restored"]).max() > 1e-3  # the pose map mattered


def _job_like(job, pose):
    return Job(job.photo, job.fitted, pose, job.prompt, None)


def test_without_the_part_network_the_person_mask_is_i_attn(weights, tmp_path, rng):
    partless = tmp_path / "w"
    shutil.copytree(weights, partless)
    shutil.rmtree(partless / "bodypart")
    # the stand-in's contract says its ControlNet trained on the part network's I_attn: refused, naming both
    with pytest.raises(ValueError, match="contract.json: the ControlNet trained on the part network's I_attn.*"
                                         "bodypart is missing"):
        Restorer(partless, SETTINGS, annotator=Recorder())
    (partless / "v1_controlnet" / "contract.json").unlink()  # converted weights: no contract, I_attn from masks
    with pytest.raises(ValueError, match="no bodypart/.*no annotator is set"):
        Restorer(partless, SETTINGS)
    restorer = Restorer(partless, SETTINGS, annotator=Recorder())
    assert restorer.needs_mask
    job = _job(rng)
    (_, out), = run_jobs(restorer, [job], batch=1, seed=0)
    mask = np.zeros((64, 40), np.float32)
    mask[4:40, 6:34] = 1.0  # the recorder's box, in the photo's pixels: unfit brings the intermediate back there
    np.testing.assert_allclose(out["attention"][..., 0], mask, atol=1e-5)
    assert out["restored"].shape == (64, 40, 3) and np.isfinite(out["restored"]).all()
