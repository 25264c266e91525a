"""`annotate(image) -> Annotation` over the backends of `BACKENDS`."""

from __future__ import annotations

import importlib
import warnings

import numpy as np

from diffbody_jax.annotators.base import Annotation, Annotator, AnnotatorError

# backend -> "module:factory"; a backend's module (and mediapipe or onnxruntime with it) is imported on first use
BACKENDS = {
    "keypoints-file": "diffbody_jax.annotators.keypoints_file:keypoints_file_annotator",
    "mediapipe": "diffbody_jax.annotators.mediapipe_pose:mediapipe_annotator",
    "onnx-dwpose": "diffbody_jax.annotators.onnx_dwpose:onnx_dwpose_annotator",
}
NO_ANNOTATOR = ("no annotator model is installed; install the extra (pip install 'diffbody_jax[annotators]') or give "
                "keypoints")


def resolve_backend(backend: str) -> str | None:
    """The one reading of "auto": mediapipe when the annotators extra is installed, else None (no annotator);
    "none" is None; any other name is returned as it is."""
    if backend == "none":
        return None
    if backend == "auto":
        from diffbody_jax.annotators.mediapipe_pose import available

        return "mediapipe" if available() else None
    return backend


def get_annotator(backend: str = "auto", **options) -> Annotator:
    """A callable image -> Annotation for `backend` ("auto": `resolve_backend`)."""
    name = resolve_backend(backend)
    if name is None:
        raise AnnotatorError(f"annotator {backend!r}: {NO_ANNOTATOR} (backend 'keypoints-file')")
    if name not in BACKENDS:
        raise AnnotatorError(f"annotator {name!r} unknown; known: {sorted(BACKENDS)}")
    module, factory = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), factory)(**options)


def default_annotator() -> Annotator | None:
    """The "auto" annotator, or None when none is installed (callers fall back and say so)."""
    return None if resolve_backend("auto") is None else get_annotator("auto")


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
