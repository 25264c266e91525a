"""Pose rendering: colours at limb and joint positions of hand-made keypoints, thresholds, formats."""

import numpy as np
import pytest

from diffbody_jax.data import pose

# DWPose's (and OpenPose's) drawing colours, written out from its draw_bodypose / draw_handpose / draw_facepose
# (RGB): one colour per limb and joint, hand bones along the HSV hue circle, blue hand joints, white face points.
DWPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
DWPOSE_HAND_BONE_0 = (255, 0, 0)  # hsv_to_rgb(0 / 20, 1, 1) * 255
DWPOSE_HAND_JOINT = (0, 0, 255)
DWPOSE_FACE = (255, 255, 255)


def _openpose_person(points: dict[int, tuple[float, float]], score=0.9):
    kp = np.zeros((18, 3), np.float32)
    for joint, (x, y) in points.items():
        kp[joint] = (x, y, score)
    return kp


def _dim(color):
    return tuple(int(c * pose.LIMB_DIM) for c in color)


def test_body_limbs_and_joints_have_openpose_colours():
    # Neck (1) at (50, 40), right shoulder (2) at (20, 40), left shoulder (5) at (80, 40), nose (0) at (50, 15).
    kp = _openpose_person({1: (50, 40), 2: (20, 40), 5: (80, 40), 0: (50, 15)})
    canvas = pose.render_pose(kp, "openpose18", (64, 100))
    assert canvas.shape == (64, 100, 3) and canvas.dtype == np.uint8
    assert tuple(canvas[40, 35]) == _dim(DWPOSE_COLORS[0])  # limb neck-rshoulder, limb 0, dimmed
    assert tuple(canvas[40, 65]) == _dim(DWPOSE_COLORS[1])  # limb neck-lshoulder
    assert tuple(canvas[27, 50]) == _dim(DWPOSE_COLORS[12])  # limb neck-nose
    for joint, (x, y) in {1: (50, 40), 2: (20, 40), 5: (80, 40), 0: (50, 15)}.items():
        assert tuple(canvas[y, x]) == DWPOSE_COLORS[joint]  # joints in full colour
    assert tuple(canvas[60, 50]) == (0, 0, 0)
    assert tuple(canvas[40, 35 + 0]) != tuple(canvas[40 + 6, 35])  # limbs are thin: 4 px half-width


def test_threshold_hides_joints_and_their_limbs():
    kp = _openpose_person({1: (50, 40), 2: (20, 40)})
    kp[2, 2] = 0.2
    canvas = pose.render_pose(kp, "openpose18", (64, 100), threshold=0.3)
    assert tuple(canvas[40, 20]) == (0, 0, 0) and tuple(canvas[40, 35]) == (0, 0, 0)
    assert tuple(canvas[40, 50]) == DWPOSE_COLORS[1]
    shown = pose.render_pose(kp, "openpose18", (64, 100), threshold=0.1)
    assert tuple(shown[40, 35]) == _dim(DWPOSE_COLORS[0])


def test_coco17_gets_a_neck_between_the_shoulders():
    coco = np.zeros((17, 3), np.float32)
    coco[5] = (80, 40, 0.9)  # left shoulder
    coco[6] = (20, 40, 0.8)  # right shoulder
    body, hands, face = pose.split_parts(coco, "coco17")
    assert hands is None and face is None and body.shape == (1, 18, 3)
    np.testing.assert_allclose(body[0, 1], (50, 40, 0.8))
    np.testing.assert_allclose(body[0, 2], coco[6])  # OpenPose 2 = right shoulder
    canvas = pose.render_pose(coco, "coco17", (64, 100))
    assert tuple(canvas[40, 50]) == DWPOSE_COLORS[1]
    coco[6, 2] = 0.1
    assert pose.split_parts(coco, "coco17")[0][0, 1, 2] == 0.0  # one shoulder hidden: no neck


def test_wholebody_hands_and_face():
    kp = np.zeros((133, 3), np.float32)
    kp[91] = (30, 30, 0.9)  # left hand wrist (hand joint 0)
    kp[92] = (30, 70, 0.9)  # hand joint 1: edge 0 from joint 0
    kp[23] = (80, 20, 0.9)  # a face point
    canvas = pose.render_pose(kp, "wholebody133", (100, 100))
    assert tuple(canvas[50, 30]) == DWPOSE_HAND_BONE_0
    assert tuple(canvas[30, 30]) == DWPOSE_HAND_JOINT
    assert tuple(canvas[20, 80]) == DWPOSE_FACE
    plain = pose.render_pose(kp, "wholebody133", (100, 100), hands=False, face=False)
    assert plain.max() == 0


def test_several_people_and_bad_shapes():
    a = _openpose_person({1: (20, 20), 2: (5, 20)})
    b = _openpose_person({1: (70, 60), 2: (55, 60)})
    canvas = pose.render_pose(np.stack([a, b]), "openpose18", (80, 80))
    assert tuple(canvas[20, 20]) == tuple(canvas[60, 70]) == DWPOSE_COLORS[1]
    with pytest.raises(ValueError, match=r"coco17 keypoints need shape \[17, 3\]"):
        pose.render_pose(np.zeros((18, 3)), "coco17", (8, 8))
    assert pose.render_pose(None, "coco17", (8, 8)).max() == 0


def test_transform_keypoints_follows_resize_and_crop():
    kp = np.array([[[10.0, 20.0, 0.9]]], np.float32)
    out = pose.transform_keypoints(kp, scale=(2.0, 2.0), offset=(5, 3))
    np.testing.assert_allclose(out[0, 0], (20.5 - 3, 40.5 - 5, 0.9))
