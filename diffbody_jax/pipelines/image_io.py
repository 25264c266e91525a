"""Reading the photos a user hands to `diffbody restore` / `eval`, and writing results, with one clear problem per
bad file.

    images, problems = find_images(["photos/", "extra.jpg"])          # files, and "path: problem" lines
    photo = read_photo(path, min_size=64)                              # or raises PhotoError("path: problem")
    write_png(out / "a.png", restored, like=photo, overwrite=False)    # 8-bit, ICC profile and alpha kept

What `read_photo` accepts, converting to RGB float32 in [0, 1] and saying so in `photo.notes`:
  EXIF orientation   applied (the pixels are turned as a viewer shows them);
  grayscale (L, 1)   restored as RGB, written back as RGB (a restoration may add colour);
  16-bit (I;16, I)   scaled from 0..65535;  RGB 48-bit PNGs are read through 16-bit channels by Pillow as RGB;
  RGBA / LA / P+transparency   the colour restored, the alpha kept and put back on the output;
  CMYK               converted to RGB with Pillow's conversion (its ICC profile, a CMYK one, is not carried over).
What it refuses (PhotoError naming the file): a missing file, a directory, a non-image or unreadable file, a
truncated image, an image smaller than `min_size` on either side.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffbody_jax.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class PhotoError(ValueError):
    """One input that cannot be restored; str() is "path: problem"."""


@dataclasses.dataclass
class Photo:
    path: Path
    pixels: np.ndarray  # [H, W, 3] float32 in [0, 1], EXIF orientation applied
    alpha: np.ndarray | None = None  # [H, W] uint8, put back on the output
    icc_profile: bytes | None = None  # an RGB profile, written into the output PNG
    notes: tuple[str, ...] = ()  # conversions made, e.g. "grayscale: restored as RGB"

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Input files and the image files of input directories (sorted, not recursive); problems as lines."""
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{item}: a directory with no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif item.exists():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or directory")
    return files, problems


def read_photo(path: str | os.PathLike, min_size: int = 64) -> Photo:
    path = Path(path)
    if path.is_dir():
        raise PhotoError(f"{path}: a directory, not an image")
    try:
        with Image.open(path) as opened:
            opened.load()  # decodes now: truncated files fail here, not later
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise PhotoError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise PhotoError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PhotoError(f"{path}: unreadable or truncated image ({e})") from None
    notes = []
    icc = image.info.get("icc_profile")
    alpha = None
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        notes.append("alpha channel: kept and put back on the output")
        image = image.convert("RGB" if mode == "RGBA" else "L")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, np.float64)
        pixels = np.repeat((np.clip(array, 0, 65535) / 65535.0)[..., None], 3, axis=-1)
        notes.append("16-bit grayscale: read at full depth, restored as RGB, written as 8-bit RGB")
    elif mode == "F":
        raise PhotoError(f"{path}: floating-point image (mode F): not a photo")
    else:
        if mode in ("L", "1"):
            notes.append("grayscale: restored as RGB")
        elif mode == "CMYK":
            notes.append("CMYK: converted to RGB (its CMYK ICC profile is not carried over)")
            icc = None
        elif mode != "RGB":
            notes.append(f"mode {mode}: converted to RGB")
        pixels = np.asarray(image.convert("RGB"), np.float64) / 255.0
    h, w = pixels.shape[:2]
    if min(h, w) < min_size:
        raise PhotoError(f"{path}: {h} x {w} pixels, below the minimum of {min_size} on each side")
    return Photo(path, pixels.astype(np.float32), alpha, icc, tuple(notes))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C] float in [0, 1] -> uint8, rounded."""
    return np.round(np.clip(np.asarray(pixels, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: str | os.PathLike, pixels: np.ndarray, like: Photo | None = None,
              overwrite: bool = False) -> Path:
    """An 8-bit PNG of [H, W, 3] pixels in [0, 1], atomically; `like`'s ICC profile and alpha (resized to fit if the
    size differs) are kept. An existing file raises FileExistsError unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass --overwrite to replace it)")
    image = Image.fromarray(to_uint8(pixels), "RGB")
    if like is not None and like.alpha is not None:
        alpha = Image.fromarray(like.alpha, "L")
        image.putalpha(alpha if alpha.size == image.size else alpha.resize(image.size, Image.Resampling.BICUBIC))
    kwargs = {"icc_profile": like.icc_profile} if like is not None and like.icc_profile else {}
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", **kwargs))
    return path


def read_photos(paths: Iterable[Path], min_size: int = 64) -> tuple[list[Photo], list[str]]:
    """Every readable photo, and a "path: problem" line for each that is not."""
    photos, problems = [], []
    for p in paths:
        try:
            photos.append(read_photo(p, min_size))
        except PhotoError as e:
            problems.append(str(e))
    return photos, problems
