"""What `diffbody serve`'s page runs, without the page: uploads checked and restored exactly as `diffbody restore`
restores them, one request at a time, with each browser session's files in its own folder.

    service = RestoreService("zoo/weights", annotator=default_annotator())
    result = service.restore(session="tab-1", uploads=[Upload("/tmp/x/photo.jpg", "photo.jpg")],
                             settings=RestoreSettings(version="v1", size=64, steps=4), seed=0)
    result.photos[0].download         # the PNG `diffbody restore --batch 1 --seed 0` writes for this photo
    result.messages                   # one line per upload that could not be restored, or per warning
    service.end_session("tab-1")      # its uploads and results deleted

A request goes through `pipelines.jobs` (prepare_jobs -> run_jobs -> write_outputs) with a batch of one, so the PNG it
offers for download is the restore command's output with the same settings and seed. Restorers are kept per
settings (the last `keep`, default 2: each holds its own copy of the weights, so keep few with real-size models), so a
second request of the same settings and image shape reuses the loaded weights and the compiled programs. A lock
serialises requests: two tabs never run two device programs at once.

What an upload may be: an image Pillow reads, at most `MAX_UPLOAD_BYTES` and `MAX_PIXELS`, at least
`pipelines.image_io.read_photo`'s 64 pixels on each side. Messages name an upload by the name the browser sent,
never by the server's path, and the server never opens a path the browser names: each upload is copied into the
session's folder under a name made of its base name's safe characters.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffbody_jax.pipelines.image_io import PhotoError, to_uint8, write_png
from diffbody_jax.pipelines.jobs import PoseSource, prepare_jobs, run_jobs, write_outputs
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings, restore_defaults

MAX_UPLOAD_BYTES = 25 * 2**20  # per file; the page tells the browser the same limit
MAX_PIXELS = 40_000_000  # per photo: above it, a decoded float32 copy alone takes ~0.5 GB
KEEP_RESTORERS = 2  # default number of loaded settings kept for reuse (each holds its own copy of the weights)
ProgressHook = Callable[[int, int, int, int], None]  # (photo index, photos, stage, step index)


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file the page received: where the server stored it, and the name the browser gave it."""

    path: str
    name: str


@dataclasses.dataclass
class RestoredPhoto:
    """One restored upload: its name, the PNG offered for download, the input and output pixels ([H, W, 3] uint8),
    the input as a PNG a browser shows (`before_png`) and the intermediates as (label, PNG path)."""

    name: str
    download: Path
    before: np.ndarray
    after: np.ndarray
    before_png: Path
    intermediates: list[tuple[str, Path]]


@dataclasses.dataclass
class RestoreResult:
    photos: list[RestoredPhoto]
    messages: list[str]


def safe_stem(name: str) -> str:
    """A file stem built from `name`'s base name: letters, digits, '-', '_' and '.', at most 64 characters."""
    stem = Path(name.replace("\\", "/")).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:64]
    return stem or "photo"


def _check_upload(upload: Upload) -> str | None:
    """The problem with an upload, before it is decoded, or None."""
    size = Path(upload.path).stat().st_size
    if size > MAX_UPLOAD_BYTES:
        return f"{size / 2**20:.1f} MB, above the limit of {MAX_UPLOAD_BYTES // 2**20} MB"
    try:
        with Image.open(upload.path) as image:  # reads the header only
            w, h = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "not an image Pillow can read"
    if w * h > MAX_PIXELS:
        return f"{h} x {w} pixels, above the limit of {MAX_PIXELS / 1e6:g} megapixels"
    return None


def _uint8(image: np.ndarray) -> np.ndarray:
    """[H, W, 1 or 3] in [0, 1] -> [H, W, 3] uint8, rounded as the PNGs are written."""
    return to_uint8(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image)


INTERMEDIATE_LABELS = {"i_reg": "I_reg (SwinIR)", "i_ir": "I_ir (SwinIR)", "pose": "pose map",
                       "attention": "I_attn (attention)", "depth": "depth", "normal": "normal",
                       "i_res": "I_res (stage 1)"}


class RestoreService:
    """Restores uploads with the models of one weights folder (module docstring). annotator: what finds the pose on
    I_reg / I_ir (None: black pose maps, and the page says so)."""

    def __init__(self, weights: str | Path, annotator=None, root: str | Path | None = None,
                 keep: int = KEEP_RESTORERS):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one loaded setting must be kept")
        self.weights, self.keep = Path(weights), keep
        self.annotator = annotator
        self.root = Path(tempfile.mkdtemp(prefix="diffbody-serve-", dir=root))
        self.lock = threading.Lock()
        self.restorers: collections.OrderedDict[RestoreSettings, Restorer] = collections.OrderedDict()
        self.restorers_built = 0
        self._progress: Callable[[int, int], None] | None = None

    def _on_step(self, stage, index) -> None:
        if self._progress is not None:
            self._progress(int(stage), int(index))

    def restorer(self, settings: RestoreSettings) -> Restorer:
        """The Restorer of `settings`, loaded once and kept (the last `keep`)."""
        if settings in self.restorers:
            self.restorers.move_to_end(settings)
            return self.restorers[settings]
        while len(self.restorers) >= self.keep:  # dropped first: past `keep`, no two copies of the weights at once
            self.restorers.popitem(last=False)
        restorer = Restorer(self.weights, settings, on_step=self._on_step, annotator=self.annotator)
        self.restorers_built += 1
        self.restorers[settings] = restorer
        return restorer

    def session_folder(self, session: str) -> Path:
        folder = self.root / safe_stem(session)
        folder.mkdir(exist_ok=True)
        return folder

    def end_session(self, session: str) -> None:
        """Deletes a session's uploads and results."""
        shutil.rmtree(self.root / safe_stem(session), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _copy_uploads(self, uploads: Sequence[Upload], folder: Path) -> tuple[list[Path], list[str], list[str]]:
        """(copies in the request's folder, the browser's names of those, problems) for the uploads. A name the
        browser sent twice is shown as "name (2)" the second time, so the page tells the two apart."""
        copies, names, problems, taken, seen = [], [], [], set(), {}
        for upload in uploads:
            problem = _check_upload(upload)
            if problem:
                problems.append(f"{upload.name}: {problem}")
                continue
            stem, n = safe_stem(upload.name), 1
            while stem.lower() in taken:  # two uploads of one name still get two outputs
                n += 1
                stem = f"{safe_stem(upload.name)}_{n}"
            taken.add(stem.lower())
            copy = folder / "inputs" / (stem + Path(upload.name).suffix.lower()[:8])
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upload.path, copy)
            copies.append(copy)
            seen[upload.name] = seen.get(upload.name, 0) + 1
            names.append(upload.name if seen[upload.name] == 1 else f"{upload.name} ({seen[upload.name]})")
        return copies, names, problems

    def restore(self, session: str, uploads: Sequence[Upload], settings: RestoreSettings, seed: int = 0,
                prompt: str | None = None, progress: ProgressHook | None = None) -> RestoreResult:
        """Restores each readable upload with `settings`, each photo as `diffbody restore PHOTO --batch 1 --seed
        seed` restores it alone. Problems and warnings come back as messages naming the browser's file names."""
        with self.lock:
            folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.session_folder(session)))
            copies, names, messages = self._copy_uploads(uploads, folder)
            by_copy = {str(c): n for c, n in zip(copies, names, strict=True)}

            def named(line: str) -> str:  # the server's path -> the browser's name
                for path, name in by_copy.items():
                    line = line.replace(path, name)
                return line

            if not copies:
                return RestoreResult([], messages)
            style, default_prompt = restore_defaults(self.weights, settings.version)
            restorer = self.restorer(settings)
            out = folder / "restored"
            out.mkdir()
            jobs, problems = prepare_jobs(copies, out, settings, [prompt or default_prompt] * len(copies),
                                          PoseSource(style=style), overwrite=True)
            messages += [named(p) for p in problems]
            if self.annotator is None and not restorer.needs_mask:
                messages.append("no pose annotator is installed (the annotators extra): the pose maps are black")
            photos = []
            for index, job in enumerate(jobs):
                self._progress = None if progress is None else (
                    lambda stage, step, i=index: progress(i, len(jobs), stage, step))
                try:
                    (job, outputs), = run_jobs(restorer, [job], batch=1, seed=seed,
                                               warn=lambda m: messages.append(named(m)))
                finally:
                    self._progress = None
                write_outputs(job, outputs, out, overwrite=True, intermediates=True)
                before = write_png(folder / "before" / job.out.name, job.photo.pixels, overwrite=True)
                shown = [(INTERMEDIATE_LABELS.get(k, k), out / "intermediates" / f"{job.out.stem}_{k}.png")
                         for k in outputs if k not in ("restored", "caption")]
                photos.append(RestoredPhoto(by_copy[str(job.photo.path)], job.out, _uint8(job.photo.pixels),
                                            _uint8(outputs["restored"]), before, shown))
            return RestoreResult(photos, messages)


def message_for(error: Exception) -> str:
    """A one-line message for an error a request raised (a bad weights folder, a setting the models refuse)."""
    return str(error) if isinstance(error, (ValueError, PhotoError)) else f"{type(error).__name__}: {error}"
