"""`annotate(image) -> Annotation` over the registered backends (`base.BACKENDS`)."""

from __future__ import annotations

import warnings

import numpy as np

import diffbody_jax.annotators.keypoints_file  # noqa: F401  (registers "keypoints-file")
import diffbody_jax.annotators.onnx_dwpose  # noqa: F401  (registers "onnx-dwpose")
from diffbody_jax.annotators.base import BACKENDS, Annotation, Annotator, AnnotatorError
from diffbody_jax.annotators.mediapipe_pose import available


def get_annotator(backend: str = "auto", **options) -> Annotator:
    """A callable image -> Annotation for `backend` ("auto": mediapipe when its extra is installed)."""
    if backend == "auto":
        backend = "mediapipe" if available() else None
        if backend is None:
            raise AnnotatorError("annotator 'auto': no annotator model is installed; install the extra "
                                 "(pip install 'diffbody_jax[annotators]') or give keypoints (backend "
                                 "'keypoints-file')")
    if backend not in BACKENDS:
        raise AnnotatorError(f"annotator {backend!r} unknown; known: {sorted(BACKENDS)}")
    return BACKENDS[backend](**options)


def default_annotator() -> Annotator | None:
    """mediapipe's annotator when the annotators extra is installed, else None (callers fall back and say so)."""
    return get_annotator("mediapipe") if available() else None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"backend" or "backend:key=value,key=value" (a config string or a CLI flag) -> (backend, options), e.g.
    "onnx-dwpose:det=/models/yolox_l.onnx,pose=/models/dw-ll_ucoco_384.onnx"."""
    backend, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AnnotatorError(f"annotator spec {spec!r}: {item!r} is not key=value")
        options[key.strip()] = value.strip()
    return backend.strip() or "auto", options


def annotator_from_spec(spec: str) -> Annotator:
    backend, options = parse_spec(spec)
    try:
        return get_annotator(backend, **options)
    except TypeError as e:  # an option the backend does not take
        raise AnnotatorError(f"annotator spec {spec!r}: {e}") from None


def annotate(image: np.ndarray, backend: str = "auto", **options) -> Annotation:
    """One image ([H, W, 3] float in [0, 1] or uint8) -> its Annotation; warns when no person is found."""
    name = options.pop("name", None)
    annotation = get_annotator(backend, **options)(image, name=name)
    if annotation.num_persons == 0:
        warnings.warn(f"annotator {annotation.backend or backend}: no person found"
                      + (f" in {name}" if name else "") + "; the pose map is empty", stacklevel=2)
    return annotation
