"""The annotators' one interface: `annotate(image) -> Annotation`.

An `Annotation` holds every detected person's body keypoints in COCO-17 order and in OpenPose-18 order (the neck
is the shoulders' midpoint, as OpenPose defines it), as (x, y, confidence) rows in pixels of the image; optional
hand (2 x 21) and face points; the person mask in [0, 1] at the image's size (None when the backend gives none);
and the image size. An image with no person gives zero persons (and a warning from `annotate`), never an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from diffbody_jax.data.pose import PoseStyle, coco_to_openpose


def as_uint8(image: np.ndarray) -> np.ndarray:
    """An image for a host model: uint8 as it is, floats in [0, 1] rounded to 8 bits (clipped first)."""
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


class AnnotatorError(RuntimeError):
    """A backend that cannot run: the message names the backend and the missing extra or file."""


@dataclasses.dataclass
class Annotation:
    coco17: np.ndarray  # [P, 17, 3] float32: x, y in pixels, confidence in [0, 1]
    size: tuple[int, int]  # (H, W) of the annotated image
    mask: np.ndarray | None = None  # [H, W] float32 in [0, 1]: the person mask
    hands: np.ndarray | None = None  # [P, 2, 21, 3] (left, right), when asked and given
    face: np.ndarray | None = None  # [P, K, 3], when asked and given
    backend: str = ""
    wholebody: np.ndarray | None = None  # [P, 133, 3] COCO-WholeBody, when the backend gives it (onnx-dwpose)

    def __post_init__(self):
        self.coco17 = np.asarray(self.coco17, np.float32).reshape(-1, 17, 3)

    @property
    def num_persons(self) -> int:
        return int(self.coco17.shape[0])

    @property
    def openpose18(self) -> np.ndarray:
        """[P, 18, 3] in OpenPose's order; the neck is the shoulders' midpoint, visible when both shoulders pass
        DWPose's 0.3 threshold (its confidence is the smaller of the two)."""
        return coco_to_openpose(self.coco17, 0.3)

    @property
    def keypoints(self) -> tuple[np.ndarray, str]:
        """(keypoints, format) as a manifest stores them: COCO-WholeBody when the backend gave it or gave hands (or
        a 68-point face), assembled in its layout (feet and missing parts at confidence 0); else COCO-17."""
        if self.wholebody is not None:
            return self.wholebody, "wholebody133"
        face = self.face is not None and self.face.shape[1] == 68
        if self.hands is None and not face:
            return self.coco17, "coco17"
        out = np.zeros((self.num_persons, 133, 3), np.float32)
        out[:, :17] = self.coco17
        if face:
            out[:, 23:91] = self.face
        if self.hands is not None:
            out[:, 91:112], out[:, 112:133] = self.hands[:, 0], self.hands[:, 1]
        return out, "wholebody133"

    def pose_map(self, style: PoseStyle = PoseStyle()) -> np.ndarray:
        """The pose map at the image's size in `style` (`data.pose.PoseStyle`: DWPose's colours; hands and face
        too when the backend gave COCO-WholeBody and the style draws them), float32 RGB in [0, 1]; black when no
        person was found."""
        return style.render(*self.keypoints, self.size)

    def to_json(self) -> dict[str, Any]:
        keypoints, fmt = self.keypoints
        return {"size": list(self.size), "backend": self.backend, "keypoint_format": fmt,
                "keypoints": np.round(keypoints.astype(np.float64), 2).tolist(),
                "openpose18": np.round(self.openpose18.astype(np.float64), 2).tolist()}


Annotator = Callable[..., Annotation]
