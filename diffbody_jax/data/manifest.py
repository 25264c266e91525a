"""Data set manifests: one JSON object per line, paths relative to the manifest file.

    {"image": "images/0001.png", "caption": "a woman in a red coat walking",
     "keypoints": [[x, y, score], ...],          # optional: one person [K, 3] or several [P, K, 3], pixels;
                                                 # [] = no person in the photo (an empty pose map)
     "keypoint_format": "coco17",                # coco17 | openpose18 | wholebody133 (default coco17)
     "pose": "pose/0001.png",                    # optional pre-rendered pose map
     "depth": "depth/0001.png", "normal": "normal/0001.png",
     "attention": "attention/0001.png",          # optional body attention map
     "mask": "mask/0001.png"}                    # optional person mask (`diffbody annotate --manifest`)

Every optional map must have the image's size. `read_manifest` validates every line and raises one
`ManifestError` that names each bad line (missing file, unreadable image, wrong size, bad keypoints);
`python -m diffbody_jax.cli.data validate manifest.jsonl` prints the same report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffbody_jax.data.pose import KEYPOINT_COUNTS
from diffbody_jax.files import atomic_write

MAP_FIELDS = ("pose", "depth", "normal", "attention", "mask")
KEYPOINT_MAPS = ("pose", "parts")  # maps drawn from a line's keypoints ("parts" only from them: data.body_parts)
SINGLE_CHANNEL_MAPS = ("depth", "attention", "mask")
KNOWN_FIELDS = {"image", "caption", "keypoints", "keypoint_format", *MAP_FIELDS}


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated manifest line. size is (H, W); maps hold absolute paths; keypoints [P, K, 3] or None."""

    line: int
    image: str
    caption: str
    size: tuple[int, int]
    maps: dict[str, str]
    keypoints: np.ndarray | None = None
    keypoint_format: str = "coco17"


class ManifestError(ValueError):
    """Every bad line of a manifest, one per row: `file:line: problem`."""

    def __init__(self, path: str, problems: Sequence[str]):
        self.path, self.problems = path, list(problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems))


EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(H, W) as the image is displayed, i.e. after its EXIF orientation (phone photos often carry one)."""
    with Image.open(path) as img:
        if decode:
            img.load()  # a truncated or corrupt file fails here, not in a training worker
        h, w = img.height, img.width
        return (w, h) if img.getexif().get(EXIF_ORIENTATION) in _TRANSPOSED else (h, w)


def _parse_keypoints(value, fmt: str) -> np.ndarray:
    if fmt not in KEYPOINT_COUNTS:
        raise ValueError(f"keypoint_format {fmt!r} unknown (one of {sorted(KEYPOINT_COUNTS)})")
    arr = np.asarray(value, np.float32)
    want = KEYPOINT_COUNTS[fmt]
    if arr.size == 0:  # [] = the photo shows no person: an empty (black) pose map
        return np.zeros((0, want, 3), np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (want, 3):
        raise ValueError(f"keypoints of shape {arr.shape}; {fmt} needs [{want}, 3] or [persons, {want}, 3]")
    if not np.isfinite(arr).all():
        raise ValueError("keypoints contain NaN or inf")
    return arr


def _parse_line(text: str, lineno: int, root: Path, decode: bool, require: Sequence[str]):
    """One line -> (Record or None, problems)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"invalid JSON ({e.msg} at column {e.colno})"]
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = []
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        problems.append(f"unknown field(s) {unknown} (known: {sorted(KNOWN_FIELDS)})")
    if not isinstance(obj.get("image"), str):
        problems.append("missing 'image' (a path relative to the manifest)")
    if not isinstance(obj.get("caption"), str):
        problems.append("missing 'caption' (a string; may be empty)")
    for field in require:
        if field == "parts" and "keypoints" not in obj:
            problems.append("missing 'keypoints', which the body-part labels this pipeline requires are drawn from")
        elif field not in obj and field != "parts" and not (field in KEYPOINT_MAPS and "keypoints" in obj):
            problems.append(f"missing '{field}', which this pipeline requires")
    if problems:
        return None, problems

    size = None
    image = root / obj["image"]
    if not image.is_file():
        problems.append(f"image {obj['image']!r}: no such file ({image})")
    else:
        try:
            size = _image_size(image, decode)
        except Exception as e:  # PIL raises several types for bad files
            problems.append(f"image {obj['image']!r}: unreadable ({type(e).__name__}: {e})")

    maps = {}
    for field in MAP_FIELDS:
        if field not in obj:
            continue
        path = root / str(obj[field])
        if not path.is_file():
            problems.append(f"{field} {obj[field]!r}: no such file ({path})")
            continue
        try:
            map_size = _image_size(path, decode)
        except Exception as e:
            problems.append(f"{field} {obj[field]!r}: unreadable ({type(e).__name__}: {e})")
            continue
        if size is not None and map_size != size:
            problems.append(f"{field} {obj[field]!r}: size {map_size[1]}x{map_size[0]} (WxH) differs from "
                            f"the image's {size[1]}x{size[0]}")
        maps[field] = str(path)

    keypoints, fmt = None, obj.get("keypoint_format", "coco17")
    if "keypoints" in obj:
        try:
            keypoints = _parse_keypoints(obj["keypoints"], fmt)
        except ValueError as e:
            problems.append(f"keypoints: {e}")
    if problems:
        return None, problems
    return Record(lineno, str(image), obj["caption"], size, maps, keypoints, fmt), []


def read_manifest(
    path: str | os.PathLike, *, decode: bool = True, require: Sequence[str] = (), workers: int = 1
) -> list[Record]:
    """Parse and validate a JSONL manifest. `require`: map fields every line must have ("pose" is also
    satisfied by keypoints). `decode=False` reads only image headers (fast; a truncated file is then found when the
    loader draws it, and skipped: `data.pipeline.ExampleLoader`). `workers`: lines validated by that many threads
    at once (opening files is I/O bound and PIL's decoders release the GIL); the records keep the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    with open(path, encoding="utf-8") as f:
        lines = [(lineno, text) for lineno, text in enumerate(f, start=1) if text.strip()]

    def parse(line):
        return _parse_line(line[1], line[0], path.parent, decode, require)

    if workers > 1 and len(lines) > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            parsed = list(pool.map(parse, lines))
    else:
        parsed = [parse(line) for line in lines]
    records, problems = [], []
    for (lineno, _), (record, bad) in zip(lines, parsed, strict=True):
        problems += [f"{path}:{lineno}: {p}" for p in bad]
        if record is not None:
            records.append(record)
    if problems:
        raise ManifestError(str(path), problems)
    if not records:
        raise ManifestError(str(path), [f"{path}: no examples"])
    return records


def write_manifest(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows (dicts with paths already relative to `path`'s folder) atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)
