"""The `onnx-dwpose` backend: DWPose as the papers ran it (a YOLOX person detector, then a whole-body RTMPose /
DWPose model on each person's box), from local ONNX files, on onnxruntime, through rtmlib's pre- and
post-processing (letterbox, NMS, top-down affine crop with 1.25 padding, SimCC decoding). Several people per image.

    annotator = get_annotator("onnx-dwpose", det="models/yolox_l.onnx", pose="models/dw-ll_ucoco_384.onnx")

Nothing is downloaded: both files must exist (rtmlib itself would fetch a path it cannot find). The model input
sizes are read from the ONNX files' input shapes (YOLOX [1, 3, H, W]; the pose model [1, 3, H, W]); files with
dynamic shapes take DWPose's (640 x 640 and 384 x 288). Images go in as rtmlib's examples feed them: 8-bit BGR.
The result is COCO-WholeBody (133 points: body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand
112-132) with SimCC confidences clipped to [0, 1]; there is no person mask (`mask` is None). When the detector finds
no one, there is no person (rtmlib would otherwise pose the whole image as one box).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import numpy as np

from diffbody_jax.annotators.base import Annotation, AnnotatorError, as_uint8

EXTRA = "pip install 'diffbody_jax[annotators]' and pip install --no-deps rtmlib==0.0.16 (README: set-up)"
DEFAULT_DET_SIZE = (640, 640)  # (H, W): DWPose's YOLOX-L
DEFAULT_POSE_SIZE = (384, 288)  # (H, W): dw-ll_ucoco_384


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "rtmlib"))


def _static_hw(session, default: tuple[int, int]) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    h, w = shape[2:4] if len(shape) == 4 else (None, None)
    return (h, w) if isinstance(h, int) and isinstance(w, int) else default


def _as_bgr_uint8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(as_uint8(image)[..., 2::-1])


def onnx_dwpose_annotator(det: str | os.PathLike | None = None, pose: str | os.PathLike | None = None,
                          score_threshold: float = 0.7, nms_threshold: float = 0.45, device: str = "cpu"):
    for name, path in (("det", det), ("pose", pose)):
        if path is None:
            raise AnnotatorError(f"annotator 'onnx-dwpose': no {name} file given; pass det=YOLOX.onnx and "
                                 "pose=DWPOSE.onnx (local files: nothing is downloaded)")
        if not Path(path).is_file():
            raise AnnotatorError(f"annotator 'onnx-dwpose': {name} file {path}: no such file")
    if not available():
        raise AnnotatorError(f"annotator 'onnx-dwpose': onnxruntime or rtmlib is not installed; {EXTRA}")
    from rtmlib import YOLOX, RTMPose

    with contextlib.redirect_stdout(io.StringIO()):  # rtmlib prints a line per model loaded
        detector = YOLOX(str(det), model_input_size=DEFAULT_DET_SIZE, nms_thr=float(nms_threshold),
                         score_thr=float(score_threshold), backend="onnxruntime", device=device)
        detector.model_input_size = _static_hw(detector.session, DEFAULT_DET_SIZE)  # (H, W) in rtmlib's YOLOX
        estimator = RTMPose(str(pose), model_input_size=DEFAULT_POSE_SIZE[::-1], backend="onnxruntime",
                            device=device)
        estimator.model_input_size = _static_hw(estimator.session, DEFAULT_POSE_SIZE)[::-1]  # (W, H) in RTMPose
    outputs = [o.shape for o in estimator.session.get_outputs()]
    if len(outputs) != 2:
        raise AnnotatorError(f"annotator 'onnx-dwpose': pose file {pose}: outputs {outputs}; expected SimCC x and y "
                             "of 133 COCO-WholeBody points ([1, 133, 2W], [1, 133, 2H])")

    def run(image: np.ndarray, name: str | None = None) -> Annotation:
        del name
        bgr = _as_bgr_uint8(image)
        h, w = bgr.shape[:2]
        boxes = np.asarray(detector(bgr), np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return Annotation(np.zeros((0, 17, 3), np.float32), (h, w), backend="onnx-dwpose")
        points, scores = estimator(bgr, bboxes=boxes.tolist())
        if points.shape[1] != 133:
            raise AnnotatorError(f"annotator 'onnx-dwpose': pose file {pose} gives {points.shape[1]} points; "
                                 "expected 133 (COCO-WholeBody)")
        wholebody = np.concatenate([points, np.clip(scores, 0.0, 1.0)[..., None]], -1).astype(np.float32)
        return Annotation(wholebody[:, :17], (h, w), hands=np.stack([wholebody[:, 91:112], wholebody[:, 112:133]], 1),
                          face=wholebody[:, 23:91], backend="onnx-dwpose", wholebody=wholebody)

    return run
