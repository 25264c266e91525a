"""Depth and surface normals from local ONNX files (the priors DiffBody v2 annotated its data with: MiDaS / DPT
depth, Omnidata normals), on onnxruntime. Nothing is downloaded: export the model you use to ONNX and point here.

    depth = DepthEstimator("models/dpt_hybrid_384.onnx")(image)       # [H, W] float32 in [0, 1], bright = near
    normal = NormalEstimator("models/omnidata_normal.onnx")(image)    # [H, W, 3] float32 in [0, 1]

Both: the RGB image in [0, 1] is resized (bicubic) to the model's input size (read from the file; `input_size`
(H, W) for files with dynamic shapes, default 384 x 384), normalised as (x - mean) / std, run as [1, 3, H, W], and
the output resized (bilinear) back to the image's size. Depth: the model's relative inverse depth (MiDaS / DPT
output, [1, H, W] or [1, 1, H, W]) min-max scaled to [0, 1], so near is bright as the manifests store it; default
mean = std = 0.5 (DPT's). Normals: a [1, 3, H, W] output, by default already in [0, 1] as Omnidata's is (clamped
there); `signed=True` for models that give [-1, 1] (mapped by (n + 1) / 2); default mean 0, std 1 (Omnidata's
normal model takes the plain [0, 1] image).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from diffbody_jax.annotators.base import AnnotatorError

EXTRA = "pip install 'diffbody_jax[annotators]' (onnxruntime)"
DEFAULT_INPUT = (384, 384)


class OnnxDenseModel:
    """An image -> dense map ONNX model: the shared resize / normalise / run / resize back."""

    kind = "dense"

    def __init__(self, model: str | os.PathLike, *, input_size: Sequence[int] | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        if not Path(model).is_file():
            raise AnnotatorError(f"{self.kind} model {model}: no such file (a local ONNX file; nothing is downloaded)")
        if importlib.util.find_spec("onnxruntime") is None:
            raise AnnotatorError(f"{self.kind} model {model}: onnxruntime is not installed; {EXTRA}")
        import onnxruntime

        self.path = str(model)
        self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        static = len(shape) == 4 and all(isinstance(d, int) for d in shape[2:])
        self.input_size = tuple(int(d) for d in (shape[2:] if static else (input_size or DEFAULT_INPUT)))
        if static and input_size is not None and tuple(input_size) != self.input_size:
            raise AnnotatorError(f"{self.kind} model {model}: input_size {tuple(input_size)} but the file fixes "
                                 f"{self.input_size}")
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def raw(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] RGB (float in [0, 1] or uint8) -> the model's output [C, H, W] at the image's size."""
        image = np.asarray(image)
        rgb = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        h, w = rgb.shape[:2]
        ih, iw = self.input_size
        resized = cv2.resize(rgb[..., :3], (iw, ih), interpolation=cv2.INTER_CUBIC) if (h, w) != (ih, iw) else rgb
        x = (resized.transpose(2, 0, 1) - self.mean) / self.std
        (out,) = self.session.run(None, {self.session.get_inputs()[0].name: x[None].astype(np.float32)})[:1]
        out = np.asarray(out, np.float32).reshape(-1, *np.asarray(out).shape[-2:])
        if out.shape[-2:] != (h, w):
            out = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in out])
        return out


class DepthEstimator(OnnxDenseModel):
    kind = "depth"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """-> [H, W] float32 in [0, 1]: relative inverse depth, min-max scaled (a flat output gives zeros)."""
        out = self.raw(image)
        if out.shape[0] != 1:
            raise AnnotatorError(f"depth model {self.path}: {out.shape[0]} output channels; expected 1")
        d = out[0]
        span = float(d.max() - d.min())
        return ((d - d.min()) / span if span > 0 else np.zeros_like(d)).astype(np.float32)


class NormalEstimator(OnnxDenseModel):
    kind = "normal"

    def __init__(self, model, *, input_size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), signed: bool = False):
        super().__init__(model, input_size=input_size, mean=mean, std=std)
        self.signed = signed

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """-> [H, W, 3] float32 in [0, 1] (the manifests' normal-map encoding)."""
        out = self.raw(image)
        if out.shape[0] != 3:
            raise AnnotatorError(f"normal model {self.path}: {out.shape[0]} output channels; expected 3")
        n = (out + 1.0) / 2.0 if self.signed else out
        return np.clip(n, 0.0, 1.0).transpose(1, 2, 0).astype(np.float32)
