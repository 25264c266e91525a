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


def test_hands_go_to_the_nearer_wrist_and_join_the_wholebody_layout():
    from diffbody_jax.annotators.mediapipe_pose import assign_hands

    body = np.zeros((17, 3), np.float32)
    body[9], body[10] = (200, 300, 0.9), (60, 300, 0.9)  # the person's left wrist on the image's right

    def hand(x, y):  # a 21-point hand whose wrist is at (x, y), fingers 20 px up
        points = np.zeros((21, 3), np.float32)
        points[:, 0], points[:, 1], points[:, 2] = x, y - np.arange(21), 0.8
        return points

    far = hand(130, 50)
    left_side, right_side = hand(205, 305), hand(58, 290)
    out = assign_hands([right_side, far, left_side], body)  # MediaPipe's order says nothing about sides
    np.testing.assert_array_equal(out[0], left_side)
    np.testing.assert_array_equal(out[1], right_side)
    body[10, 2] = 0.0  # right wrist unseen: nothing goes there, the far hand still fits nowhere
    out = assign_hands([right_side, far, left_side], body)
    assert out[1, :, 2].max() == 0 and np.array_equal(out[0], left_side)

    annotation = Annotation(np.asarray([[*np.zeros((9, 3)), *body[9:11], *np.zeros((6, 3))]], np.float32), (400, 300),
                            hands=assign_hands([left_side], body)[None])
    keypoints, fmt = annotation.keypoints
    assert fmt == "wholebody133" and keypoints.shape == (1, 133, 3)
    np.testing.assert_array_equal(keypoints[0, 91:112], left_side)  # COCO-WholeBody: left hand 91-111
    assert keypoints[0, 112:, 2].max() == 0
    pose = annotation.pose_map()
    assert pose[305 - 10, 205].max() > 0  # left-hand joint 10 is drawn
