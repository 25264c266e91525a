"""The tiny zoo's photos (data/zoo_set.py): crops, mirrors and keypoints that stay on the person, a held-out photo
that no training manifest reads."""

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pose import transform_keypoints
from diffbody_jax.data.zoo_set import crop_windows, cut, held_out_photos, write_zoo_set

COCO17 = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
          "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
          "left_ankle", "right_ankle")


def _other_side(name: str) -> str:
    return name.replace("left", "@").replace("right", "left").replace("@", "right")


@pytest.fixture(scope="module")
def zoo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo_set")
    return out, write_zoo_set(out)


def test_crops_move_and_scale_keypoints_like_the_pose_module(rng):
    image = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    keypoints = np.concatenate([rng.uniform(0, 200, (1, 17, 2)), np.ones((1, 17, 1))], -1).astype(np.float32)
    top, left, side = 40, 60, 120
    _, got, _ = cut(image, keypoints, None, (top, left, side), False, 64)
    scale = 64 / side
    want = transform_keypoints(keypoints, (scale, scale), (top * scale, left * scale))
    inside = (want[..., :2] >= 0).all(-1) & (want[..., :2] <= 63).all(-1)
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-4)
    assert (got[~inside] == 0).all() and (~inside).any() and inside.any()


def test_a_mirrored_crop_keeps_each_joint_on_the_same_pixel_and_swaps_sides(rng):
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    keypoints = np.concatenate([rng.integers(0, 96, (1, 17, 2)), np.ones((1, 17, 1))], -1).astype(np.float32)
    plain, kp, _ = cut(image, keypoints, None, (0, 0, 96), False, 96)
    mirrored, kp_m, _ = cut(image, keypoints, None, (0, 0, 96), True, 96)
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])
    for j, name in enumerate(COCO17):
        m = COCO17.index(_other_side(name))  # the person in the mirror raises the other hand
        x, y = kp[0, j, :2].round().astype(int)
        xm, ym = kp_m[0, m, :2].round().astype(int)
        assert ym == y and xm == 95 - x, name
        np.testing.assert_array_equal(mirrored[ym, xm], plain[y, x])


def test_windows_span_the_photo():
    assert crop_windows(512, 1.0) == [(0, 0, 512)]
    windows = crop_windows(512, 0.5)
    assert len(windows) == 9 and {(t, l) for t, l, _ in windows} >= {(0, 0), (256, 256)}
    assert all(side == 256 for _, _, side in windows)


def test_manifests_read_and_the_held_out_photo_is_in_none_of_them(zoo_set):
    out, paths = zoo_set
    people = read_manifest(paths["people"], require=("pose", "depth", "normal"))
    photos = read_manifest(paths["photos"], require=("pose", "depth", "normal"))  # scenes: no visible keypoint
    assert all(r.keypoints[..., 2].max() == 0 for r in photos[len(people):])
    assert len(people) == 2 * (1 + 9 + 9 + 9) * 2  # two photos, four window sizes, mirrored
    assert len(photos) > len(people)
    held_out = read_manifest(paths["held_out"])
    assert [r.image.rsplit("/", 1)[-1] for r in held_out] == [f"{n}.png" for n in held_out_photos()]
    assert held_out, "matplotlib (the annotators extra) ships the held-out portrait"
    trained = {r.image for r in photos}
    for record in held_out:
        assert record.image not in trained
        pixels = np.asarray(Image.open(record.image).convert("RGB"))
        # no training crop is the portrait (or a crop of it) at any size: compare with its own downscale
        small = np.asarray(Image.fromarray(pixels).resize((128, 128), Image.LANCZOS), np.float32)
        for r in photos:
            crop = np.asarray(Image.open(r.image).convert("RGB"), np.float32)
            assert np.abs(crop - small).mean() > 10, r.image
