"""Body-part label maps from keypoints: the training targets of the body-part network's pixel classifier.

    labels = part_label_map(keypoints, "coco17", (H, W))   # uint8 [H, W]: 0 background, 1..5 FIVE_PARTS

BPBreID learns its part attention from labels that a pose model's part fields give (PifPaf's confidence fields
grouped into five parts). No such model runs offline here, so the labels are drawn from the keypoints the
manifest already holds: each part a union of simple shapes around its joints, sized by the person's torso,
painted in a fixed order so that a later part wins where two overlap (torso, legs, feet, arms and hands, head:
limbs in front of the torso, the head on top). These are coarse silhouettes of the parts, not segmentations:
what a network trained on them learns is where each part is, nothing about identity.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from diffbody_jax.data.pose import split_parts

# must equal models.bodypart.FIVE_PARTS (data/ does not import models/; tests/data/test_body_parts.py checks it)
PART_NAMES = ("head", "upper_body", "arms_hands", "legs", "feet")
PAINT_ORDER = ("upper_body", "legs", "feet", "arms_hands", "head")

# OpenPose-18 joints (data.pose.split_parts converts every format to it)
NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = range(8)
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)
HEAD = (NOSE, R_EYE, L_EYE, R_EAR, L_EAR)
ARMS = ((R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST), (L_SHOULDER, L_ELBOW), (L_ELBOW, L_WRIST))
LEGS = ((R_HIP, R_KNEE), (R_KNEE, R_ANKLE), (L_HIP, L_KNEE), (L_KNEE, L_ANKLE))
# widths as fractions of the person's torso length (neck to the hips' midpoint)
HALF_WIDTH = {"arms_hands": 0.16, "legs": 0.22}
HAND_RADIUS, FOOT_RADIUS, HEAD_RADIUS, TORSO_HALF_WIDTH = 0.18, 0.18, 0.32, 0.30
MIN_UNIT = 4.0  # pixels: the smallest torso length used for sizing (a tiny or partly visible person)


def _scale(person: np.ndarray, visible: np.ndarray) -> float:
    """The person's torso length in pixels, or a stand-in from the shoulders or the visible points' extent."""
    hips = [j for j in (R_HIP, L_HIP) if visible[j]]
    if visible[NECK] and hips:
        return max(MIN_UNIT, float(np.linalg.norm(person[NECK, :2] - person[hips, :2].mean(0))))
    if visible[R_SHOULDER] and visible[L_SHOULDER]:
        return max(MIN_UNIT, 1.6 * float(np.linalg.norm(person[R_SHOULDER, :2] - person[L_SHOULDER, :2])))
    points = person[visible, :2]
    return max(MIN_UNIT, 0.3 * float(np.ptp(points[:, 1]))) if len(points) > 1 else MIN_UNIT


def _segment(canvas: np.ndarray, a, b, half_width: float, label: int) -> None:
    """A filled capsule from a to b (x, y) of `half_width` pixels."""
    (xa, ya), (xb, yb) = a, b
    length = math.hypot(xb - xa, yb - ya)
    angle = math.degrees(math.atan2(yb - ya, xb - xa))
    centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
    axes = (max(1, int(round(length / 2 + half_width))), max(1, int(round(half_width))))
    cv2.fillConvexPoly(canvas, cv2.ellipse2Poly(centre, axes, int(round(angle)), 0, 360, 5), label)


def _disc(canvas: np.ndarray, centre, radius: float, label: int) -> None:
    cv2.circle(canvas, (int(round(centre[0])), int(round(centre[1]))), max(1, int(round(radius))), label, -1)


def _paint_person(canvas: np.ndarray, person: np.ndarray, threshold: float) -> None:
    visible = person[:, 2] > threshold
    unit = _scale(person, visible)
    label = {name: i + 1 for i, name in enumerate(PART_NAMES)}
    xy = person[:, :2]

    def torso():
        corners = [xy[j] for j in (R_SHOULDER, L_SHOULDER, L_HIP, R_HIP) if visible[j]]
        hips = [j for j in (R_HIP, L_HIP) if visible[j]]
        if not hips and visible[R_SHOULDER] and visible[L_SHOULDER]:
            # hips hidden or out of the frame (a half-length portrait): the torso goes one torso length down from
            # the shoulders, perpendicular to them
            across = xy[L_SHOULDER] - xy[R_SHOULDER]
            down = np.array([-across[1], across[0]]) / max(1e-6, float(np.linalg.norm(across)))
            down = down if down[1] >= 0 else -down
            corners += [xy[R_SHOULDER] + unit * down, xy[L_SHOULDER] + unit * down]
        if len(corners) >= 3:
            hull = cv2.convexHull(np.round(np.asarray(corners)).astype(np.int32))
            cv2.fillConvexPoly(canvas, hull, label["upper_body"])
        if visible[NECK] and hips:  # a capsule down the spine widens a thin (side-on) torso
            _segment(canvas, xy[NECK], xy[hips].mean(0), TORSO_HALF_WIDTH * unit, label["upper_body"])

    def limbs(pairs, name):
        for a, b in pairs:
            if visible[a] and visible[b]:
                _segment(canvas, xy[a], xy[b], HALF_WIDTH[name] * unit, label[name])

    def ends(joints, parents, radius, name):
        for joint, parent in zip(joints, parents, strict=True):
            if not visible[joint]:
                continue
            centre = xy[joint]
            if visible[parent]:  # hands and feet extend past the wrist / ankle, along the limb
                direction = xy[joint] - xy[parent]
                centre = centre + 0.5 * radius * unit * direction / max(1e-6, float(np.linalg.norm(direction)))
            _disc(canvas, centre, radius * unit, label[name])

    def head():
        points = [j for j in HEAD if visible[j]]
        if points:
            centre = xy[points].mean(0)
            spread = float(np.max(np.linalg.norm(xy[points] - centre, axis=1)))
            _disc(canvas, centre, max(HEAD_RADIUS * unit, 1.2 * spread), label["head"])

    painters = {"upper_body": torso, "legs": lambda: limbs(LEGS, "legs"),
                "feet": lambda: ends((R_ANKLE, L_ANKLE), (R_KNEE, L_KNEE), FOOT_RADIUS, "feet"),
                "arms_hands": lambda: (limbs(ARMS, "arms_hands"),
                                       ends((R_WRIST, L_WRIST), (R_ELBOW, L_ELBOW), HAND_RADIUS, "arms_hands")),
                "head": head}
    for name in PAINT_ORDER:
        painters[name]()


def part_label_map(keypoints, fmt: str, size: tuple[int, int], threshold: float = 0.3,
                   part_names: tuple[str, ...] = PART_NAMES) -> np.ndarray:
    """uint8 [H, W] part labels of every person in `keypoints` (pixels of a canvas of `size` = (H, W)): 0 the
    background, i the part `part_names[i - 1]`. Empty keypoints give an all-background map."""
    if tuple(part_names) != PART_NAMES:
        raise ValueError(f"part labels are drawn for the parts {PART_NAMES}; the network has {tuple(part_names)}")
    canvas = np.zeros(size, np.uint8)
    if keypoints is None or np.size(keypoints) == 0:
        return canvas
    body, _, _ = split_parts(keypoints, fmt, threshold)
    for person in body:
        _paint_person(canvas, person, threshold)
    return canvas
