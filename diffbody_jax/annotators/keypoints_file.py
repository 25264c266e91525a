"""The `keypoints-file` backend: keypoints the user gives, no model. The file is a manifest (JSONL: `image`,
`keypoints`, `keypoint_format`, as `data.manifest` reads them) or a JSON object {name: {"keypoints": ...,
"keypoint_format": ...}}; images are matched by file name or stem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from diffbody_jax.annotators.base import Annotation, AnnotatorError
from diffbody_jax.data.pose import as_persons

FORMATS_WITH_BODY = ("coco17", "wholebody133")


def read_keypoints(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, str]]:
    path = Path(path)
    if not path.is_file():
        raise AnnotatorError(f"annotator 'keypoints-file': {path}: no such file")
    table = {}
    text = path.read_text()
    try:
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                else [{"image": k, **v} for k, v in json.loads(text).items()])
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise AnnotatorError(f"annotator 'keypoints-file': {path}: not a manifest or a JSON object of keypoints "
                             f"({e})") from None
    for n, row in enumerate(rows, 1):
        fmt = row.get("keypoint_format", "coco17")
        if "keypoints" not in row or "image" not in row:
            raise AnnotatorError(f"annotator 'keypoints-file': {path}: entry {n} needs 'image' and 'keypoints'")
        try:
            kp = as_persons(row["keypoints"], fmt)
        except ValueError as e:
            raise AnnotatorError(f"annotator 'keypoints-file': {path}: entry {n} ({row['image']}): {e}") from None
        if fmt not in FORMATS_WITH_BODY:
            raise AnnotatorError(f"annotator 'keypoints-file': {path}: entry {n}: format {fmt!r}; give COCO-17 "
                                 f"or COCO-WholeBody keypoints ({FORMATS_WITH_BODY})")
        name = Path(row["image"]).name
        table[name] = table[Path(name).stem] = (kp, fmt)
    return table


def keypoints_file_annotator(keypoints: str | os.PathLike):
    table = read_keypoints(keypoints)

    def run(image: np.ndarray, name: str | None = None) -> Annotation:
        h, w = np.asarray(image).shape[:2]
        key = None if name is None else (Path(name).name if Path(name).name in table else Path(name).stem)
        if key not in table:
            return Annotation(np.zeros((0, 17, 3), np.float32), (h, w), backend="keypoints-file")
        kp, fmt = table[key]
        hands = np.stack([kp[:, 91:112], kp[:, 112:133]], 1) if fmt == "wholebody133" else None
        face = kp[:, 23:91] if fmt == "wholebody133" else None
        return Annotation(kp[:, :17], (h, w), hands=hands, face=face, backend="keypoints-file",
                          wholebody=kp if fmt == "wholebody133" else None)

    return run
