"""Fill a training manifest from the annotators: keypoints and a person-mask path for each line, and optionally
depth and normal maps (`annotators.dense`) and captions (`annotators.caption`).

    report = fill_manifest(get_annotator("mediapipe"), "data/train.jsonl", "data/train_annotated.jsonl",
                           depth=DepthEstimator("dpt.onnx"), normal=NormalEstimator("omnidata.onnx"))

Every line keeps its other fields; image and map paths are rewritten relative to the output's folder. The masks go
to `<output folder>/<masks>/<image stem>.png` (8-bit grey, 255 = person). A line that already has keypoints keeps
them unless `replace`; a line whose image shows no person gets `"keypoints": []` (and a report line), so the pipeline
renders an empty pose map for it. Depth and normal maps go to `depth/` and `normal/` beside the masks (8-bit PNGs,
replacing a line's own only with `replace`); a captioner fills empty captions (all with `replace`). The output is
written atomically and validated with `data.manifest.read_manifest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffbody_jax.annotators.base import Annotator, as_uint8
from diffbody_jax.data.manifest import MAP_FIELDS, ManifestError, read_manifest, write_manifest
from diffbody_jax.files import atomic_write


@dataclasses.dataclass
class FillReport:
    lines: int = 0
    annotated: int = 0
    kept: int = 0
    no_person: list[str] = dataclasses.field(default_factory=list)
    maps: int = 0  # depth / normal maps written
    captions: int = 0  # captions written


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(path.absolute(), folder.absolute())


def _save_png(path: Path, pixels: np.ndarray) -> None:
    """[H, W] or [H, W, 3] in [0, 1] -> an 8-bit PNG, atomically."""
    array = as_uint8(pixels)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def fill_manifest(annotator: Annotator | None, source: str | os.PathLike, out: str | os.PathLike, *,
                  masks: str = "mask", replace: bool = False, depth=None, normal=None, captioner=None) -> FillReport:
    """Annotate every image of manifest `source` and write manifest `out` with `keypoints`, `keypoint_format`
    and `mask` filled in (`annotator` None: keypoints and masks untouched), and `depth`, `normal`, `caption` when
    those estimators are given. The source is validated first (a `ManifestError` names each bad line)."""
    source, out = Path(source), Path(out)
    read_manifest(source, decode=False)
    root, folder = source.parent, out.parent
    report, rows, stems = FillReport(), [], {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        report.lines += 1
        image_path = root / row["image"]
        with Image.open(image_path) as img:
            pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        for field in ("image", *MAP_FIELDS):
            if field in row:
                row[field] = _relative(root / row[field], folder)
        stem = Path(row["image"]).stem
        if stem in stems:  # the written maps are named by the image's stem
            raise ManifestError(str(source), [f"images {stems[stem]} and {row['image']} share the name {stem!r}: "
                                              "their masks and maps would overwrite each other"])
        stems[stem] = row["image"]
        for field, estimator in (("depth", depth), ("normal", normal)):
            if estimator is not None and (replace or field not in row):
                _save_png(folder / field / f"{stem}.png", estimator(pixels))
                row[field] = f"{field}/{stem}.png"
                report.maps += 1
        if captioner is not None and (replace or not row.get("caption")):
            row["caption"] = captioner(pixels)
            report.captions += 1
        if annotator is None:
            rows.append(row)
            continue
        annotation = annotator(pixels, name=image_path.name)
        if "keypoints" in row and not replace:
            report.kept += 1
        elif annotation.num_persons:
            keypoints, fmt = annotation.keypoints
            row["keypoints"] = np.round(keypoints.astype(np.float64), 2).tolist()
            row["keypoint_format"] = fmt
            report.annotated += 1
        else:  # an explicit empty list: no person, an empty pose map (a line without keypoints has no pose)
            row["keypoints"] = []
            row.pop("keypoint_format", None)
            report.no_person.append(str(image_path))
        if annotation.mask is not None:
            _save_png(folder / masks / f"{stem}.png", annotation.mask)
            row["mask"] = f"{masks}/{stem}.png"
        rows.append(row)
    write_manifest(out, rows)
    try:
        read_manifest(out, decode=False)
    except ManifestError as e:  # a bug here, not the user's: say which file to look at
        raise ManifestError(str(out), [f"the filled manifest does not validate: {p}" for p in e.problems]) from None
    return report
