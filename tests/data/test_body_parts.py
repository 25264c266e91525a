"""Body-part labels drawn from keypoints (data/body_parts.py) and the pipeline's "parts" map."""

import json

import numpy as np
import pytest

from diffbody_jax.data.body_parts import PART_NAMES, part_label_map
from diffbody_jax.data.manifest import ManifestError, read_manifest
from diffbody_jax.data.pipeline import DataConfig, make_dataset
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.models.bodypart import FIVE_PARTS

HEAD, UPPER_BODY, ARMS_HANDS, LEGS, FEET = range(1, 6)

# a person standing in a 128 x 64 (H x W) canvas, COCO order (x, y, score); arms hanging, feet apart
STANDING = np.array([
    [32, 14, 1], [29, 12, 1], [35, 12, 1], [26, 14, 1], [38, 14, 1],  # nose, eyes, ears
    [22, 30, 1], [42, 30, 1],  # shoulders (left, right in COCO: the person's left is image right here)
    [18, 50, 1], [46, 50, 1], [16, 68, 1], [48, 68, 1],  # elbows, wrists
    [26, 66, 1], [38, 66, 1],  # hips
    [25, 90, 1], [39, 90, 1], [24, 112, 1], [40, 112, 1],  # knees, ankles
], np.float32)


def test_parts_are_the_networks_five():
    assert PART_NAMES == FIVE_PARTS


def test_each_part_lies_where_its_joints_are():
    labels = part_label_map(STANDING, "coco17", (128, 64))
    assert labels.shape == (128, 64) and labels.dtype == np.uint8
    expected = {(14, 32): HEAD, (45, 32): UPPER_BODY, (59, 47): ARMS_HANDS, (40, 20): ARMS_HANDS,
                (78, 25): LEGS, (101, 39): LEGS, (116, 24): FEET, (5, 5): 0, (120, 60): 0, (64, 5): 0}
    got = {yx: int(labels[yx]) for yx in expected}
    assert got == expected
    assert set(np.unique(labels)) == {0, HEAD, UPPER_BODY, ARMS_HANDS, LEGS, FEET}


def test_hidden_joints_and_no_person_draw_nothing():
    assert not part_label_map(np.zeros((0, 17, 3)), "coco17", (32, 16)).any()
    hidden = STANDING.copy()
    hidden[:, 2] = 0.1  # every score under the threshold
    assert not part_label_map(hidden, "coco17", (128, 64), threshold=0.3).any()
    no_legs = STANDING.copy()
    no_legs[13:, 2] = 0  # knees and ankles hidden: no legs below the hips, no feet
    labels = part_label_map(no_legs, "coco17", (128, 64))
    assert FEET not in labels and labels[101, 39] == 0


def test_another_part_grouping_is_refused():
    with pytest.raises(ValueError, match="drawn for the parts .*'head'.*the network has \\('a', 'b'\\)"):
        part_label_map(STANDING, "coco17", (128, 64), part_names=("a", "b"))


def test_the_pipeline_draws_parts_with_the_crop_and_needs_keypoints(tmp_path):
    manifest = write_sample_set(tmp_path / "sample")
    records = read_manifest(manifest, require=("parts",))
    batch = next(iter(make_dataset(records, DataConfig(batch_size=2, buckets=((64, 64),), maps=("parts", "pose")),
                                   lambda image, rng: _Identity(image), seed=0)))
    parts, pose = batch["parts"], batch["pose"]
    assert parts.shape == (2, 64, 64, 1) and parts.dtype == np.float32
    assert set(np.unique(parts)) <= set(range(6)) and (parts > 0).mean() > 0.05
    # the labels follow the same crop as the pose map: every drawn joint disc lies on a part or next to one
    drawn = pose.max(-1) > 0
    assert (parts[..., 0][drawn] > 0).mean() > 0.8

    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    del lines[0]["keypoints"]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(ManifestError, match="missing 'keypoints', which the body-part labels"):
        read_manifest(manifest, require=("parts",))


class _Identity:
    """A degradation stand-in (the pipeline only needs .upsampled and .low_res)."""

    def __init__(self, image):
        self.upsampled = self.low_res = image
