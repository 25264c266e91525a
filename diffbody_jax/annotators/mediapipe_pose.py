"""The `mediapipe` backend: BlazePose's 33 landmarks mapped to COCO-17, and the pose model's segmentation as the
person mask, from the models inside the `mediapipe==0.10.14` wheel (the `annotators` extra; later releases no
longer bundle them). One person per image: BlazePose tracks a single person.

BlazePose -> COCO-17 (`BLAZEPOSE_TO_COCO17`, index in BlazePose's 33 for each COCO joint):

| COCO-17 | name | BlazePose |
|---|---|---|
| 0 | nose | 0 nose |
| 1, 2 | left, right eye | 2 left_eye, 5 right_eye (the eye centres, not the inner/outer corners) |
| 3, 4 | left, right ear | 7 left_ear, 8 right_ear |
| 5, 6 | left, right shoulder | 11, 12 |
| 7, 8 | left, right elbow | 13, 14 |
| 9, 10 | left, right wrist | 15, 16 |
| 11, 12 | left, right hip | 23, 24 |
| 13, 14 | left, right knee | 25, 26 |
| 15, 16 | left, right ankle | 27, 28 |

Confidence = BlazePose's visibility. BlazePose's mouth, hand (pinky, index, thumb) and foot (heel, toe) points have
no COCO-17 joint and are dropped. OpenPose-18 follows from COCO-17 (`data.pose.coco_to_openpose`: the neck is the
shoulders' midpoint, as OpenPose defines it).

hands=True also runs MediaPipe Hands (static images, up to two hands): its 21 points per hand are in OpenPose's and
COCO-WholeBody's hand order (wrist, then thumb, index, middle, ring, pinky from base to tip), and each detected hand
goes to the person's left or right by the nearer COCO wrist (within `HAND_REACH` of the hand's size), not by
MediaPipe's handedness label, which assumes a mirrored selfie. Confidence = the hand's detection score. Faces are
not given: the holistic graph that would give them does not load on protobuf 5 (README: set-up), and its 468-point
mesh has no agreed 68-point correspondence; use onnx-dwpose for faces.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

from diffbody_jax.annotators.base import Annotation, AnnotatorError, as_uint8

BLAZEPOSE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
COCO_WRISTS = (9, 10)  # left, right
HAND_REACH = 2.0  # a hand's wrist may lie this many hand sizes (wrist to middle-finger base) from the body's wrist
EXTRA = "pip install 'diffbody_jax[annotators]' (mediapipe==0.10.14, whose wheel carries the models)"


def available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


def blazepose_to_coco17(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[P, 33, 3+] BlazePose landmarks (x, y normalised to the image, ..., visibility last) -> [P, 17, 3] COCO-17
    keypoints in pixels (x * W, y * H; pixel centres at +0.5 are not shifted: BlazePose's coordinates are
    continuous), confidence = visibility."""
    lm = np.asarray(landmarks, np.float32).reshape(-1, 33, landmarks.shape[-1])
    h, w = size
    body = lm[:, list(BLAZEPOSE_TO_COCO17)]
    return np.stack([body[..., 0] * w, body[..., 1] * h, np.clip(body[..., -1], 0.0, 1.0)], -1)


def assign_hands(hands: list[np.ndarray], body: np.ndarray) -> np.ndarray:
    """Detected hands ([21, 3] each, pixels + confidence) -> [2, 21, 3] (person's left, right): each hand to the
    nearer visible COCO wrist of `body` [17, 3] if its wrist lies within HAND_REACH hand sizes of it (the better
    fit first); the rest are dropped. Unfilled sides are zeros (confidence 0: not drawn)."""
    out = np.zeros((2, 21, 3), np.float32)
    pairs = []
    for h, hand in enumerate(hands):
        size = max(float(np.linalg.norm(hand[9, :2] - hand[0, :2])), 1.0)
        for side, joint in enumerate(COCO_WRISTS):
            if body[joint, 2] > 0:
                distance = float(np.linalg.norm(hand[0, :2] - body[joint, :2])) / size
                if distance <= HAND_REACH:
                    pairs.append((distance, h, side))
    used_hands, used_sides = set(), set()
    for _, h, side in sorted(pairs):
        if h not in used_hands and side not in used_sides:
            out[side] = hands[h]
            used_hands.add(h)
            used_sides.add(side)
    return out


def mediapipe_annotator(model_complexity: int = 1, min_confidence: float = 0.5, hands: bool = False):
    if not available():
        raise AnnotatorError(f"annotator 'mediapipe': mediapipe is not installed; {EXTRA}")
    import mediapipe as mp

    # options may come as strings from a spec ("mediapipe:hands=true,model_complexity=2")
    hands = hands if isinstance(hands, bool) else str(hands).lower() in ("1", "true", "yes")
    model_complexity, min_confidence = int(model_complexity), float(min_confidence)
    pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=model_complexity,
                                  enable_segmentation=True, min_detection_confidence=min_confidence)
    hand_model = (mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2,
                                           min_detection_confidence=min_confidence) if hands else None)

    def find_hands(rgb: np.ndarray, body: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        result = hand_model.process(rgb)
        found = [np.asarray([[p.x * w, p.y * h, handedness.classification[0].score] for p in lm.landmark],
                            np.float32)
                 for lm, handedness in zip(result.multi_hand_landmarks or [], result.multi_handedness or [],
                                                   strict=True)]
        return assign_hands(found, body)[None]

    def run(image: np.ndarray, name: str | None = None) -> Annotation:
        del name
        rgb = as_uint8(image)
        h, w = rgb.shape[:2]
        with warnings.catch_warnings():  # mediapipe 0.10.14 on protobuf 5.x: a deprecation it cannot act on
            warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
            result = pose.process(np.ascontiguousarray(rgb[..., :3]))
        if result.pose_landmarks is None:
            return Annotation(np.zeros((0, 17, 3), np.float32), (h, w), np.zeros((h, w), np.float32),
                              backend="mediapipe")
        lm = np.asarray([[p.x, p.y, p.z, p.visibility] for p in result.pose_landmarks.landmark], np.float32)
        mask = (np.asarray(result.segmentation_mask, np.float32) if result.segmentation_mask is not None
                else None)
        body = blazepose_to_coco17(lm[None], (h, w))
        found = find_hands(np.ascontiguousarray(rgb[..., :3]), body[0]) if hand_model is not None else None
        return Annotation(body, (h, w), mask, hands=found, backend="mediapipe")

    return run
