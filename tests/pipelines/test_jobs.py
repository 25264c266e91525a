"""The host side of a restore (pipelines/jobs.py): a photo in which the annotator finds no person gets the same empty
pose map that training draws for a no-person manifest line (`"keypoints": []`), in the run's pose style."""

from pathlib import Path

import numpy as np
from PIL import Image

from diffbody_jax.annotators.base import Annotation
from diffbody_jax.data.degradations import TABLE1_MIXTURES, table1_mixture
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pipeline import DataConfig, ExampleLoader
from diffbody_jax.data.pose import PoseStyle
from diffbody_jax.pipelines.fit import fit_to_bucket
from diffbody_jax.pipelines.image_io import Photo
from diffbody_jax.pipelines.jobs import Job, poses_and_masks

STYLE = PoseStyle(threshold=0.2, hands=False, face=False)


class _Restorer:
    """What poses_and_masks reads of a Restorer: its annotator, pose style, mask need and SwinIR stage."""

    needs_mask = False
    pose_style = STYLE

    def __init__(self):
        self.regressed = 0

    def annotator(self, image, name=None):
        return Annotation(np.zeros((0, 17, 3)), image.shape[:2])  # nobody there

    def regress(self, degraded):
        self.regressed += 1
        return np.clip(degraded, 0.0, 1.0)


def test_no_person_is_the_same_empty_map_in_training_and_restoring(tmp_path, rng):
    pixels = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "wall.png")
    (tmp_path / "train.jsonl").write_text('{"image": "wall.png", "caption": "", "keypoints": []}\n')
    records = read_manifest(tmp_path / "train.jsonl", require=("pose",))
    loader = ExampleLoader(records, DataConfig(batch_size=1, buckets=((64, 64),), maps=("pose",), pose_style=STYLE),
                           table1_mixture(next(iter(TABLE1_MIXTURES))), seed=0)
    trained = loader({"record": 0, "epoch": 0})["pose"]

    restorer = _Restorer()
    job = Job(Photo(Path("wall.png"), pixels), fit_to_bucket(pixels, ((64, 64),)), None, "p", tmp_path / "o.png")
    poses, masks, i_reg = poses_and_masks(restorer, [job])
    assert restorer.regressed == 1 and i_reg is not None and masks is None  # SwinIR once; handed on to the pipeline
    np.testing.assert_array_equal(poses[0], trained)
    assert trained.shape == (64, 64, 3) and trained.max() == 0
