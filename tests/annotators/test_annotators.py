"""The annotators' interface without a model: the BlazePose -> COCO-17 and COCO-17 -> OpenPose-18 orders against
hand-made tables of joint names, the keypoints-file backend, an image without a person, and clear errors for a
backend that cannot run. (The mediapipe backend's own test on a photo comes with the `annotators` extra.)"""

import json

import numpy as np
import pytest

from diffbody_jax.annotators import Annotation, AnnotatorError, annotate, get_annotator
from diffbody_jax.annotators.mediapipe_pose import available, blazepose_to_coco17

# public joint names, written out by hand from the two models' documentation
BLAZEPOSE_NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)
COCO17_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                "right_knee", "left_ankle", "right_ankle")
OPENPOSE18_NAMES = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
                    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
                    "right_eye", "left_eye", "right_ear", "left_ear")


def test_blazepose_landmarks_land_on_the_coco_joint_of_the_same_name(rng):
    landmarks = np.zeros((1, 33, 4), np.float32)
    landmarks[0, :, 0] = np.arange(33) / 100.0  # x encodes the BlazePose index
    landmarks[0, :, 1] = 0.5
    landmarks[0, :, 3] = rng.uniform(0.2, 1.0, 33)
    coco = blazepose_to_coco17(landmarks, (200, 100))
    for i, name in enumerate(COCO17_NAMES):
        j = BLAZEPOSE_NAMES.index(name)
        np.testing.assert_allclose(coco[0, i], [j / 100.0 * 100, 100.0, landmarks[0, j, 3]], rtol=1e-6)


def test_openpose18_order_and_neck():
    coco = np.zeros((1, 17, 3), np.float32)
    coco[0, :, 0] = np.arange(17)  # x encodes the COCO index
    coco[0, :, 2] = 0.9
    coco[0, 5, :2], coco[0, 6, :2] = (10.0, 20.0), (30.0, 40.0)
    op = Annotation(coco, (64, 64)).openpose18
    for i, name in enumerate(OPENPOSE18_NAMES):
        if name == "neck":
            np.testing.assert_allclose(op[0, i], [20.0, 30.0, 0.9])  # the shoulders' midpoint
        else:
            assert op[0, i, 0] == coco[0, COCO17_NAMES.index(name), 0], name


def test_keypoints_file_backend_and_an_image_without_a_person(tmp_path, rng):
    kp = np.concatenate([rng.uniform(0, 60, (17, 2)), rng.uniform(0.5, 1, (17, 1))], -1)
    manifest = tmp_path / "kp.jsonl"
    manifest.write_text(json.dumps({"image": "images/a.png", "keypoints": kp.tolist(), "keypoint_format": "coco17"}))
    image = rng.uniform(0, 1, (64, 48, 3)).astype(np.float32)
    found = annotate(image, "keypoints-file", keypoints=manifest, name="a.png")
    assert found.num_persons == 1 and found.size == (64, 48)
    np.testing.assert_allclose(found.coco17[0], kp, rtol=1e-6)
    assert found.pose_map().shape == (64, 48, 3) and found.pose_map().max() > 0
    with pytest.warns(UserWarning, match="no person found in b.png"):
        empty = annotate(image, "keypoints-file", keypoints=manifest, name="b.png")
    assert empty.num_persons == 0 and empty.pose_map().max() == 0


def test_backends_that_cannot_run_say_why(tmp_path):
    with pytest.raises(AnnotatorError, match="'keypoints-file'.*no such file"):
        get_annotator("keypoints-file", keypoints=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a.png": {"keypoints": [[1, 2, 3]]}}))
    with pytest.raises(AnnotatorError, match=r"bad.json: entry 1 \(a.png\)"):
        get_annotator("keypoints-file", keypoints=bad)
    with pytest.raises(AnnotatorError, match="unknown; known"):
        get_annotator("openpifpaf")
    if not available():
        with pytest.raises(AnnotatorError, match=r"'mediapipe'.*diffbody_jax\[annotators\]"):
            get_annotator("mediapipe")
        with pytest.raises(AnnotatorError, match="'auto'.*keypoints-file"):
            get_annotator("auto")
