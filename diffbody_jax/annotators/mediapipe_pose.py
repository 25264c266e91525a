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
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

from diffbody_jax.annotators.base import Annotation, AnnotatorError, register

BLAZEPOSE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
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


@register("mediapipe")
def mediapipe_annotator(model_complexity: int = 1, min_confidence: float = 0.5):
    if not available():
        raise AnnotatorError(f"annotator 'mediapipe': mediapipe is not installed; {EXTRA}")
    import mediapipe as mp

    pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=model_complexity,
                                  enable_segmentation=True, min_detection_confidence=min_confidence)

    def run(image: np.ndarray, name: str | None = None) -> Annotation:
        del name
        image = np.asarray(image)
        rgb = image if image.dtype == np.uint8 else np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
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
        return Annotation(blazepose_to_coco17(lm[None], (h, w)), (h, w), mask, backend="mediapipe")

    return run
