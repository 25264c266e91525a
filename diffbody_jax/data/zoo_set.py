"""The tiny zoo's training and evaluation photos, made from what installed packages ship (nothing is downloaded).

    write_zoo_set("zoo/data", annotator=default_annotator())
    # -> people.jsonl   person crops (keypoints, stand-in depth and normal maps, masks when an annotator ran):
    #                   every phase that sees a person
    #    photos.jsonl   the person crops and crops of scikit-image's other photos (no visible keypoint, stand-in
    #                   depth and normal maps): the phases that learn to restore images, not only people
    #    held_out/      matplotlib's portrait of Grace Hopper (and its keypoints in held_out.jsonl): evaluation only

Training photos: scikit-image's two photos of people (`astronaut`, the `camera` man) as square crops at four
scales (the whole photo, and windows of 3/4, 5/8 and 1/2 of its side on a grid), each also mirrored (keypoints
mirrored with left and right swapped), resized to `crop_size`; the degradations are drawn per step by the training
pipeline (Real-ESRGAN's), not here. Keypoints come from the annotator run on each whole photo when one is given
(cut and scaled with the crops, like its person masks), else from the hand-written ones of data/sample_set.py.
Captions are the sample set's hand-written ones. Depth and normal maps are `stand_in_maps` of each crop.

Held out: `grace_hopper.jpg` from matplotlib's sample data (matplotlib comes with the annotators extra). It is in
no manifest a phase reads; without matplotlib there is no held-out photo and `held_out` is empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from diffbody_jax.data.manifest import write_manifest
from diffbody_jax.data.sample_set import ASTRONAUT_KEYPOINTS, CAMERA_KEYPOINTS, SAMPLES, load_photo, stand_in_maps

CROP_SIZE = 128  # twice the zoo's 64 x 64 training bucket: the pipeline's area resize still has detail to average
WINDOWS = (1.0, 0.75, 0.625, 0.5)  # crop side / photo side
PEOPLE = {"astronaut": ASTRONAUT_KEYPOINTS, "camera": CAMERA_KEYPOINTS}
CAPTIONS = {photo_name: caption for _, photo_name, crop, caption, _ in SAMPLES if crop is None}
# scikit-image's photos without a person (each installed with it, none fetched): texture and colour for the
# autoencoder and SwinIR. The saturated ones (the motorcycle scene, the retina, the stained tissue) are there because
# the first zoo's SwinIR, trained without them, pulled the held-out portrait's blue background down by ~14/255.
SCENES = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field", "stereo_motorcycle",
          "retina", "immunohistochemistry")
HELD_OUT = {"grace_hopper": "a colour portrait of a woman in a navy uniform with medals against a blue background"}
# COCO-17's mirror image: nose, then the (left, right) pairs swapped
COCO17_MIRROR = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def crop_windows(size: int, fraction: float) -> list[tuple[int, int, int]]:
    """(top, left, side) of the square windows of `fraction` x `size`: one for the whole photo, else a 3 x 3 grid
    from corner to corner."""
    side = round(size * fraction)
    if side >= size:
        return [(0, 0, size)]
    starts = np.linspace(0, size - side, 3).round().astype(int)
    return [(int(top), int(left), side) for top in starts for left in starts]


def cut(image: np.ndarray, keypoints: np.ndarray, mask: np.ndarray | None, window: tuple[int, int, int],
        mirror: bool, out_size: int):
    """The window of a photo (its keypoints [P, 17, 3] and mask moved with it), mirrored if asked, resized to
    `out_size` square. Keypoints that leave the window get score 0."""
    top, left, side = window
    scale = out_size / side
    crop = Image.fromarray(image[top:top + side, left:left + side]).resize((out_size, out_size), Image.LANCZOS)
    kp = np.array(keypoints, np.float32, copy=True)
    kp[..., 0] = (kp[..., 0] - left + 0.5) * scale - 0.5
    kp[..., 1] = (kp[..., 1] - top + 0.5) * scale - 0.5
    outside = (kp[..., 0] < 0) | (kp[..., 0] > out_size - 1) | (kp[..., 1] < 0) | (kp[..., 1] > out_size - 1)
    kp[outside] = 0.0
    cut_mask = None
    if mask is not None:
        m = Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8)[top:top + side, left:left + side])
        cut_mask = np.asarray(m.resize((out_size, out_size), Image.BILINEAR))
    crop = np.asarray(crop)
    if mirror:
        crop = crop[:, ::-1]
        cut_mask = None if cut_mask is None else cut_mask[:, ::-1]
        kp = kp[:, list(COCO17_MIRROR)]
        visible = kp[..., 2] > 0
        kp[..., 0] = np.where(visible, out_size - 1 - kp[..., 0], 0.0)
    return np.ascontiguousarray(crop), kp, None if cut_mask is None else np.ascontiguousarray(cut_mask)


def _save(out: Path, field: str, name: str, array: np.ndarray) -> str:
    (out / field).mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(out / field / f"{name}.png")
    return f"{field}/{name}.png"


def _annotate(annotator, image: np.ndarray, name: str, fallback) -> tuple[np.ndarray, np.ndarray | None]:
    if annotator is not None:
        found = annotator(image, name=name)
        if found.num_persons:
            return np.asarray(found.coco17, np.float32), found.mask
    return np.asarray([fallback], np.float32), None


def held_out_photos() -> dict[str, np.ndarray]:
    """{name: RGB uint8} of the held-out photos that are installed (none without matplotlib)."""
    try:
        import matplotlib.cbook
    except ImportError:
        return {}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return {"grace_hopper": np.asarray(Image.open(f).convert("RGB"))}


def write_zoo_set(out_dir: str | os.PathLike, annotator=None, crop_size: int = CROP_SIZE) -> dict[str, Path]:
    """Write the zoo's photos and manifests under `out_dir`; returns {"people", "photos", "held_out"} manifest
    paths. annotator: an `annotators` callable for keypoints and person masks (None: the hand-written keypoints)."""
    out = Path(out_dir)
    people, scenes = [], []
    for photo_name, hand_keypoints in PEOPLE.items():
        image = load_photo(photo_name)
        keypoints, mask = _annotate(annotator, image, photo_name, hand_keypoints)
        for fraction in WINDOWS:
            for w, window in enumerate(crop_windows(image.shape[0], fraction)):
                for mirror in (False, True):
                    name = f"{photo_name}_{round(fraction * 1000):04d}_{w}{'_m' if mirror else ''}"
                    crop, kp, crop_mask = cut(image, keypoints, mask, window, mirror, crop_size)
                    row = {"image": _save(out, "images", name, crop), "caption": CAPTIONS[photo_name],
                           "keypoints": np.round(kp if len(kp) > 1 else kp[0], 2).tolist(),
                           "keypoint_format": "coco17"}
                    if crop_mask is not None:
                        row["mask"] = _save(out, "mask", name, crop_mask)
                    depth, normal = stand_in_maps(crop)
                    row["depth"], row["normal"] = _save(out, "depth", name, depth), _save(out, "normal", name, normal)
                    people.append(row)
    for scene in SCENES:
        image = load_photo(scene)
        side = min(image.shape[:2])
        image = image[:side, :side]
        for fraction in WINDOWS[1:]:
            for w, window in enumerate(crop_windows(side, fraction)):
                name = f"{scene}_{round(fraction * 1000):04d}_{w}"
                crop, _, _ = cut(image, np.zeros((1, 17, 3)), None, window, False, crop_size)
                # no person: no keypoint is visible (an empty pose map), so every phase may read the scenes
                depth, normal = stand_in_maps(crop)
                scenes.append({"image": _save(out, "images", name, crop), "caption": "",
                               "keypoints": np.zeros((17, 3)).tolist(), "keypoint_format": "coco17",
                               "depth": _save(out, "depth", name, depth), "normal": _save(out, "normal", name, normal)})
    held_out = []
    for name, image in held_out_photos().items():
        keypoints, mask = _annotate(annotator, image, name, np.zeros((17, 3)))
        row = {"image": _save(out, "held_out", name, image), "caption": HELD_OUT[name],
               "keypoints": np.round(keypoints if len(keypoints) > 1 else keypoints[0], 2).tolist(),
               "keypoint_format": "coco17"}
        if mask is not None:
            row["mask"] = _save(out, "held_out_mask", name, np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8))
        held_out.append(row)
    paths = {"people": out / "people.jsonl", "photos": out / "photos.jsonl", "held_out": out / "held_out.jsonl"}
    write_manifest(paths["people"], people)
    write_manifest(paths["photos"], people + scenes)
    write_manifest(paths["held_out"], held_out)
    return paths
