"""A small real data set for tests and demos, built from photos of people that ship inside scikit-image.

    python -m diffbody_jax.cli.data sample-set --out data/sample     # writes images/ and manifest.jsonl

Two photos (skimage.data.astronaut: Eileen Collins in a flight suit; skimage.data.camera: the
"cameraman", grey) and two crops of them (a portrait and a landscape, so three of the five buckets are
used). Captions were written by hand. Keypoints (COCO-17: x, y, score in pixels) come from an annotator run on
each whole photo (`diffbody data sample-set` and the demo pass mediapipe's when the annotators extra is installed;
its person masks go to mask/ and the `mask` field), cut to the crops like the photos; without an annotator, from
keypoints written by hand from the photos (a score of 0 marks a joint outside the frame, low scores joints hidden
behind something). Nothing is downloaded: the photos are files of the installed scikit-image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from diffbody_jax.data.manifest import write_manifest

# COCO-17 order: nose, eyes (l, r), ears (l, r), shoulders, elbows, wrists, hips, knees, ankles (l, r each).
ASTRONAUT_KEYPOINTS = [
    (218, 118, 0.95), (248, 97, 0.95), (195, 98, 0.95), (290, 108, 0.6), (162, 110, 0.6),
    (335, 255, 0.9), (75, 265, 0.9), (345, 420, 0.45), (45, 420, 0.7), (300, 500, 0.1), (150, 495, 0.6),
    (0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0),
]
CAMERA_KEYPOINTS = [
    (250, 165, 0.9), (240, 150, 0.2), (237, 150, 0.8), (0, 0, 0.0), (195, 150, 0.7),
    (175, 175, 0.35), (125, 190, 0.8), (265, 240, 0.4), (150, 285, 0.6), (305, 200, 0.5), (210, 225, 0.8),
    (110, 400, 0.35), (95, 405, 0.5), (130, 500, 0.2), (120, 500, 0.2), (0, 0, 0.0), (0, 0, 0.0),
]

SAMPLES = [
    # name, photo, crop (top, bottom, left, right) or None, caption, keypoints
    ("astronaut", "astronaut", None,
     "a smiling woman astronaut with short brown hair in an orange flight suit, holding a helmet, "
     "an american flag and a space shuttle model behind her", ASTRONAUT_KEYPOINTS),
    ("cameraman", "camera", None,
     "a black and white photo of a man in a dark coat looking through a camera on a tripod in a field",
     CAMERA_KEYPOINTS),
    ("astronaut_portrait", "astronaut", (0, 512, 80, 432),
     "portrait of a woman astronaut in an orange suit, smiling at the camera", ASTRONAUT_KEYPOINTS),
    ("cameraman_landscape", "camera", (100, 400, 0, 512),
     "a man in a dark coat filming with a video camera on a tripod, buildings on the horizon", CAMERA_KEYPOINTS),
]


def load_photo(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("the sample set needs scikit-image: pip install scikit-image") from e
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.stack([image] * 3, -1) if image.ndim == 2 else image


def stand_in_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(depth [H, W] uint8, normal [H, W, 3] uint8) made from a photo alone, for running the v2 phases on the sample
    set: depth = the blurred luminance (bright = near, as MiDaS's inverse depth is drawn), normals = that surface's
    unit normals (-dz/dx, -dz/dy, 1) encoded from [-1, 1] to [0, 255]. Stand-ins, not estimates of anything."""
    from PIL import ImageFilter

    grey = Image.fromarray(image).convert("L").filter(ImageFilter.GaussianBlur(4))
    z = np.asarray(grey, np.float32) / 255.0
    z = (z - z.min()) / max(float(z.max() - z.min()), 1e-6)
    dz_dy, dz_dx = np.gradient(z * 20.0)
    normal = np.stack([-dz_dx, -dz_dy, np.ones_like(z)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return np.round(z * 255).astype(np.uint8), np.round((normal * 0.5 + 0.5) * 255).astype(np.uint8)


def _annotated(annotator, photo: str, cache: dict):
    """(keypoints [P, 17, 3], mask [H, W] or None) of a whole photo from `annotator` (None: no person found)."""
    if photo not in cache:
        annotation = annotator(load_photo(photo), name=photo)
        cache[photo] = (annotation.coco17, annotation.mask) if annotation.num_persons else None
    return cache[photo]


def write_sample_set(out_dir: str | os.PathLike, stand_in_priors: bool = False, annotator=None) -> Path:
    """Write images/*.png and manifest.jsonl under `out_dir`; returns the manifest's path. stand_in_priors: also
    depth/*.png and normal/*.png (`stand_in_maps`) and their manifest fields. annotator: an `annotators` callable
    (image -> Annotation) for the keypoints and person masks (None: the hand-written keypoints, no masks)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}
    for name, photo, crop, caption, keypoints in SAMPLES:
        image = load_photo(photo)
        found = _annotated(annotator, photo, cache) if annotator is not None else None
        kp = np.asarray(found[0] if found else [keypoints], np.float32).copy()
        mask = found[1] if found else None
        if crop is not None:
            top, bottom, left, right = crop
            image = image[top:bottom, left:right]
            mask = None if mask is None else mask[top:bottom, left:right]
            kp[..., 0] -= left
            kp[..., 1] -= top
            inside = (kp[..., 0] >= 0) & (kp[..., 0] < right - left) & (kp[..., 1] >= 0) & (kp[..., 1] < bottom - top)
            kp[~inside, 2] = 0.0
        Image.fromarray(image).save(out / "images" / f"{name}.png")
        row = {
            "image": f"images/{name}.png",
            "caption": caption,
            "keypoints": np.round(kp if len(kp) > 1 else kp[0], 2).tolist(),
            "keypoint_format": "coco17",
        }
        if mask is not None:
            (out / "mask").mkdir(exist_ok=True)
            Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8)).save(out / "mask" / f"{name}.png")
            row["mask"] = f"mask/{name}.png"
        if stand_in_priors:
            depth, normal = stand_in_maps(image)
            for field, array in (("depth", depth), ("normal", normal)):
                (out / field).mkdir(exist_ok=True)
                Image.fromarray(array).save(out / field / f"{name}.png")
                row[field] = f"{field}/{name}.png"
        rows.append(row)
    path = out / "manifest.jsonl"
    write_manifest(path, rows)
    return path
