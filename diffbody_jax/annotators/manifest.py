"""Fill a training manifest from an annotator: keypoints and a person-mask path for each line.

    report = fill_manifest(get_annotator("mediapipe"), "data/train.jsonl", "data/train_annotated.jsonl")

Every line keeps its other fields; image and map paths are rewritten relative to the output's folder. The masks go
to `<output folder>/<masks>/<image stem>.png` (8-bit grey, 255 = person). A line that already has keypoints keeps
them unless `replace`; a line whose image shows no person gets no keypoints (and a report line), so the pipeline
renders an empty pose map for it. The output is written atomically and validated with `data.manifest.read_manifest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffbody_jax.annotators.base import Annotator
from diffbody_jax.data.manifest import MAP_FIELDS, ManifestError, read_manifest, write_manifest
from diffbody_jax.files import atomic_write


@dataclasses.dataclass
class FillReport:
    lines: int = 0
    annotated: int = 0
    kept: int = 0
    no_person: list[str] = dataclasses.field(default_factory=list)


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(path.absolute(), folder.absolute())


def fill_manifest(annotator: Annotator, source: str | os.PathLike, out: str | os.PathLike, *,
                  masks: str = "mask", replace: bool = False) -> FillReport:
    """Annotate every image of manifest `source` and write manifest `out` with `keypoints`, `keypoint_format`
    and `mask` filled in. The source is validated first (a `ManifestError` names each bad line)."""
    source, out = Path(source), Path(out)
    read_manifest(source, decode=False)
    root, folder = source.parent, out.parent
    (folder / masks).mkdir(parents=True, exist_ok=True)
    report, rows = FillReport(), []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        report.lines += 1
        image_path = root / row["image"]
        with Image.open(image_path) as img:
            pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        annotation = annotator(pixels, name=image_path.name)
        for field in ("image", *MAP_FIELDS):
            if field in row:
                row[field] = _relative(root / row[field], folder)
        if "keypoints" in row and not replace:
            report.kept += 1
        elif annotation.num_persons:
            keypoints, fmt = annotation.keypoints
            row["keypoints"] = np.round(keypoints.astype(np.float64), 2).tolist()
            row["keypoint_format"] = fmt
            report.annotated += 1
        else:
            row.pop("keypoints", None)
            row.pop("keypoint_format", None)
            report.no_person.append(str(image_path))
        if annotation.mask is not None:
            mask_path = folder / masks / f"{Path(row['image']).stem}.png"
            grey = np.round(np.clip(annotation.mask, 0.0, 1.0) * 255).astype(np.uint8)
            atomic_write(mask_path, lambda tmp, g=grey: Image.fromarray(g, "L").save(tmp, format="PNG"))
            row["mask"] = _relative(mask_path, folder)
        rows.append(row)
    write_manifest(out, rows)
    try:
        read_manifest(out, decode=False)
    except ManifestError as e:  # a bug here, not the user's: say which file to look at
        raise ManifestError(str(out), [f"the filled manifest does not validate: {p}" for p in e.problems]) from None
    return report
