"""Pose maps from keypoints, drawn as OpenPose / DWPose draw them (what pose ControlNets were trained on).

    canvas = render_pose(keypoints, "coco17", (H, W))     # uint8 [H, W, 3] RGB

Keypoints are [K, 3] or [persons, K, 3] rows of (x, y, score) in pixels of the canvas. Formats:
  coco17        the COCO body order; the neck is added as the shoulders' midpoint (visible only when both are)
  openpose18    OpenPose's body order (nose, neck, right arm, left arm, right leg, left leg, eyes, ears)
  wholebody133  COCO-WholeBody: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand
A point is drawn when its score exceeds `threshold` (DWPose uses 0.3).

Body limbs are filled ellipses of half-width 4 in one of 18 colours, dimmed to 60%, then the joints as
radius-4 discs in full colour; hand bones are 2-px lines coloured by an HSV ramp with blue joints; face
points are white radius-3 discs.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import cv2
import numpy as np

KEYPOINT_COUNTS = {"coco17": 17, "openpose18": 18, "wholebody133": 133}

# OpenPose's 17 drawn limbs (0-based joint pairs) and its 18 colours (RGB), in OpenPose's order.
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_COLORS = tuple(
    tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES))
)
HAND_JOINT_COLOR = (0, 0, 255)
FACE_COLOR = (255, 255, 255)
LIMB_HALF_WIDTH, JOINT_RADIUS, FACE_RADIUS, HAND_LINE = 4, 4, 3, 2
LIMB_DIM = 0.6

# COCO body index of each OpenPose joint (-1: the neck, made from the shoulders 5 and 6).
COCO_TO_OPENPOSE = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


def as_persons(keypoints, fmt: str) -> np.ndarray:
    """[K, 3] or [P, K, 3] -> float32 [P, K, 3], checked against the format's K."""
    if fmt not in KEYPOINT_COUNTS:
        raise ValueError(f"keypoint format {fmt!r} unknown (one of {sorted(KEYPOINT_COUNTS)})")
    kp = np.asarray(keypoints, np.float32)
    kp = kp[None] if kp.ndim == 2 else kp
    if kp.ndim != 3 or kp.shape[1:] != (KEYPOINT_COUNTS[fmt], 3):
        raise ValueError(f"{fmt} keypoints need shape [{KEYPOINT_COUNTS[fmt]}, 3] or [P, ..., 3], got {kp.shape}")
    return kp


def coco_to_openpose(body: np.ndarray, threshold: float) -> np.ndarray:
    """[P, 17, 3] COCO body -> [P, 18, 3] OpenPose body; the neck's score is kept only if both shoulders pass."""
    out = body[:, [max(i, 0) for i in COCO_TO_OPENPOSE]].copy()
    shoulders = body[:, [5, 6]]
    out[:, 1, :2] = shoulders[:, :, :2].mean(1)
    visible = (shoulders[:, :, 2] > threshold).all(1)
    out[:, 1, 2] = np.where(visible, shoulders[:, :, 2].min(1), 0.0)
    return out


def split_parts(keypoints, fmt: str, threshold: float = 0.3):
    """-> (body [P, 18, 3] OpenPose order, hands [P, 2, 21, 3] or None, face [P, 68, 3] or None)."""
    kp = as_persons(keypoints, fmt)
    if fmt == "openpose18":
        return kp, None, None
    body = coco_to_openpose(kp[:, :17], threshold)
    if fmt == "coco17":
        return body, None, None
    face = kp[:, 23:91]
    hands = np.stack([kp[:, 91:112], kp[:, 112:133]], axis=1)
    return body, hands, face


def _visible(point: np.ndarray, threshold: float) -> bool:
    return bool(point[2] > threshold)


def render_pose(
    keypoints,
    fmt: str,
    size: tuple[int, int],
    threshold: float = 0.3,
    hands: bool = True,
    face: bool = True,
) -> np.ndarray:
    """Draw a pose map of `size` (H, W): uint8 [H, W, 3] RGB on black. Empty keypoints give a black map."""
    h, w = size
    canvas = np.zeros((h, w, 3), np.uint8)
    if keypoints is None or np.size(keypoints) == 0:
        return canvas
    body, hand_kp, face_kp = split_parts(keypoints, fmt, threshold)

    limbs = np.zeros_like(canvas)
    for person in body:
        for limb, (a, b) in enumerate(BODY_LIMBS):
            if not (_visible(person[a], threshold) and _visible(person[b], threshold)):
                continue
            (xa, ya), (xb, yb) = person[a, :2], person[b, :2]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            polygon = cv2.ellipse2Poly(
                (int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(limbs, polygon, BODY_COLORS[limb])
    canvas = (limbs.astype(np.float32) * LIMB_DIM).astype(np.uint8)
    for person in body:
        for joint, point in enumerate(person):
            if _visible(point, threshold):
                cv2.circle(canvas, (int(point[0]), int(point[1])), JOINT_RADIUS, BODY_COLORS[joint], thickness=-1)

    if hands and hand_kp is not None:
        for hand in hand_kp.reshape(-1, 21, 3):
            for edge, (a, b) in enumerate(HAND_EDGES):
                if _visible(hand[a], threshold) and _visible(hand[b], threshold):
                    pa, pb = tuple(int(v) for v in hand[a, :2]), tuple(int(v) for v in hand[b, :2])
                    cv2.line(canvas, pa, pb, HAND_COLORS[edge], thickness=HAND_LINE)
            for point in hand:
                if _visible(point, threshold):
                    cv2.circle(canvas, (int(point[0]), int(point[1])), JOINT_RADIUS, HAND_JOINT_COLOR, thickness=-1)
    if face and face_kp is not None:
        for point in face_kp.reshape(-1, 3):
            if _visible(point, threshold):
                cv2.circle(canvas, (int(point[0]), int(point[1])), FACE_RADIUS, FACE_COLOR, thickness=-1)
    return canvas


@dataclasses.dataclass(frozen=True)
class PoseStyle:
    """How pose maps are drawn: the one value training (the data pipeline and the annotated-pose hook), restoring
    and `diffbody annotate` read, carried by a run's contract so that restoring draws as the model was trained.

    threshold: a point is drawn when its score exceeds it (DWPose's 0.3); hands / face: draw them when the
    keypoints carry them (COCO-WholeBody)."""

    threshold: float = 0.3
    hands: bool = True
    face: bool = True

    def render(self, keypoints, fmt: str, size: tuple[int, int]) -> np.ndarray:
        """`render_pose` in this style, as float32 [H, W, 3] in [0, 1] (what the models read). None or zero
        persons: an all-black map (a photo with no person)."""
        return render_pose(keypoints, fmt, size, self.threshold, self.hands, self.face).astype(np.float32) / 255.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PoseStyle:
        unknown = sorted(set(d) - {"threshold", "hands", "face"})
        if unknown:
            raise ValueError(f"pose style: unknown field(s) {unknown}; fields: threshold, hands, face")
        default = cls()
        return cls(float(d.get("threshold", default.threshold)), bool(d.get("hands", default.hands)),
                   bool(d.get("face", default.face)))

    @classmethod
    def parse(cls, spec: str) -> PoseStyle:
        """"threshold=0.3,hands=1,face=0" (any subset; the rest default) -> PoseStyle (config.parse_arg's syntax)."""
        from diffbody_jax.config import parse_arg

        return cls.from_dict(parse_arg(spec, **cls().to_dict()))


def transform_keypoints(keypoints: np.ndarray, scale: tuple[float, float], offset: tuple[float, float]):
    """Apply a resize (sy, sx) then a crop offset (top, left) to [P, K, 3] pixel keypoints; scores kept.

    Pixel centres map as x' = (x + 0.5) * sx - 0.5 - left, consistent with image resampling.
    """
    out = np.array(keypoints, np.float32, copy=True)
    out[..., 0] = (out[..., 0] + 0.5) * scale[1] - 0.5 - offset[1]
    out[..., 1] = (out[..., 1] + 0.5) * scale[0] - 0.5 - offset[0]
    return out
