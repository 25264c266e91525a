"""Offline annotators: keypoints (COCO-17 and OpenPose-18) and a person mask for any photo.

    annotation = annotate(image, backend="keypoints-file", keypoints="manifest.jsonl", name="photo")

Backends: "keypoints-file" (the user's keypoints, no model), "mediapipe" (BlazePose and its person mask, the
`annotators` extra) and "onnx-dwpose" (DWPose from local ONNX files, several people). Depth, normals
(`annotators.dense`) and captions (`annotators.caption`) for training manifests; `annotators.manifest` fills a
manifest with all of them.
"""

from diffbody_jax.annotators.annotate import (
    BACKENDS,
    NO_ANNOTATOR,
    annotate,
    annotator_from_spec,
    default_annotator,
    get_annotator,
    parse_spec,
    resolve_backend,
)
from diffbody_jax.annotators.base import Annotation, AnnotatorError

__all__ = ["BACKENDS", "NO_ANNOTATOR", "Annotation", "AnnotatorError", "annotate", "annotator_from_spec",
           "default_annotator", "get_annotator", "parse_spec", "resolve_backend"]
