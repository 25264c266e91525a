"""`--fit bucket`: any photo onto one of the model's resolution buckets and back, losing nothing.

    fitted = fit_to_bucket(pixels, buckets)          # [H', W', 3] of a bucket's size, the photo inside it
    restored_full = fitted.unfit(restored)           # back to the photo's own size

The bucket is the one nearest in aspect ratio (`data.pipeline.nearest_bucket`, the training pipeline's choice). The
photo is scaled, keeping its aspect, to the largest size that fits inside the bucket, and the rest of the bucket is
filled by reflecting the photo's edges (a border the models see as a continuation, not a black frame); `unfit` crops
that border off and scales back to the photo's size. Unlike training's cover-and-crop no part of the photo is
dropped. Scaling uses area interpolation down and bicubic up (`data.degradations.resize`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from diffbody_jax.data.degradations import resize
from diffbody_jax.data.pipeline import nearest_bucket


@dataclasses.dataclass(frozen=True)
class Fitted:
    pixels: np.ndarray  # [bucket H, bucket W, C]
    bucket: tuple[int, int]
    inner: tuple[int, int, int, int]  # (top, left, height, width) of the scaled photo inside the bucket
    original: tuple[int, int]  # the photo's (H, W)

    def unfit(self, image: np.ndarray) -> np.ndarray:
        """A result at the bucket's size -> the photo's size (the reflected border cropped off)."""
        if tuple(image.shape[:2]) != self.bucket:
            raise ValueError(f"unfit: expected an image of the bucket's size {self.bucket}, got {image.shape[:2]}")
        top, left, h, w = self.inner
        inner = np.ascontiguousarray(image[top: top + h, left: left + w])
        mode = "area" if h > self.original[0] else "bicubic"
        return resize(inner, self.original, mode) if (h, w) != self.original else inner


def fit_to_bucket(pixels: np.ndarray, buckets: Sequence[tuple[int, int]]) -> Fitted:
    """[H, W, C] float pixels -> `Fitted` at the nearest bucket's size."""
    h, w = pixels.shape[:2]
    bucket = tuple(buckets[nearest_bucket((h, w), buckets)])
    scale = min(bucket[0] / h, bucket[1] / w)
    inner_h, inner_w = min(bucket[0], max(1, round(h * scale))), min(bucket[1], max(1, round(w * scale)))
    mode = "area" if scale < 1 else "bicubic"
    scaled = resize(np.asarray(pixels, np.float32), (inner_h, inner_w), mode) if (inner_h, inner_w) != (h, w) \
        else np.asarray(pixels, np.float32)
    top, left = (bucket[0] - inner_h) // 2, (bucket[1] - inner_w) // 2
    pad = ((top, bucket[0] - inner_h - top), (left, bucket[1] - inner_w - left), (0, 0))
    # "symmetric" reflection needs the pad to be at most the image's size: repeat for very elongated photos
    out = scaled
    while out.shape[0] < bucket[0] or out.shape[1] < bucket[1]:
        need = [(min(p[0], s), min(p[1], s)) for p, s in zip(pad[:2], out.shape[:2], strict=True)]
        out = np.pad(out, (*need, (0, 0)), mode="symmetric")
        pad = tuple((p[0] - n[0], p[1] - n[1]) for p, n in zip(pad[:2], need, strict=True)) + ((0, 0),)
    return Fitted(out.astype(np.float32), bucket, (top, left, inner_h, inner_w), (h, w))


def fit_by_padding(pixels: np.ndarray, multiple: int) -> Fitted:
    """`--fit tile`: the photo at its own size, its bottom and right edges reflected out to a multiple of `multiple`
    (the tiles' granularity); `unfit` crops the border off again, nothing is rescaled."""
    h, w = pixels.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    out = np.asarray(pixels, np.float32)
    while out.shape[0] < h + ph or out.shape[1] < w + pw:  # "symmetric" pads by at most the image's size at once
        need_h, need_w = min(h + ph - out.shape[0], out.shape[0]), min(w + pw - out.shape[1], out.shape[1])
        out = np.pad(out, ((0, need_h), (0, need_w), (0, 0)), mode="symmetric")
    return Fitted(out, (h + ph, w + pw), (0, 0, h, w), (h, w))
