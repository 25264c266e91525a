"""The host side of a restore: photos become jobs (fitted to a bucket or padded for tiles, with a pose map and a
prompt), jobs are batched by bucket through a `Restorer`, and results are written back at each photo's size.

    jobs, problems = prepare_jobs(files, out, restorer.settings, prompts, PoseSource(keypoints=..., style=...), False)
    for job, outputs in run_jobs(restorer, jobs, batch=4, seed=0):
        write_outputs(job, outputs, out, overwrite=False, intermediates=True)

Pose maps: a `PoseSource` draws given keypoints (a manifest) or reads pose images (a folder), in the model's
training pose style (`data.pose.PoseStyle`, from the run's contract); photos it has none for get the annotator's
keypoints on the regressed image (I_reg / I_ir: the papers annotate it), drawn the same way, or a black map (no
annotator, or no person found: the empty map a no-person training example gets). SwinIR then runs once per batch:
its output is handed to the pipeline (`Restorer.restore(i_reg=...)`). The last batch of a bucket is padded to the
batch size, so each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from diffbody_jax.data.pose import PoseStyle, as_persons, transform_keypoints

TILE_MULTIPLE = 64  # --fit tile pads photos to this: the VAE factor and SwinIR's window x unshuffle divide it


@dataclasses.dataclass
class Job:
    """One photo on its way through: fitted to its bucket, with its pose map and prompt."""

    photo: object  # image_io.Photo
    fitted: object  # fit.Fitted
    pose: np.ndarray | None  # [bucket H, bucket W, 3]; None: from the annotator (black without one)
    prompt: str
    out: Path


class PoseSource:
    """Pose maps for inputs from a keypoints manifest or a folder of pose images; None for an input it has none
    for (the annotator's, or black). table: keypoints given directly, {file stem: ([P, K, 3] or [K, 3] in the
    photo's pixels, format)}. style: how keypoints are drawn (the model's training style)."""

    def __init__(self, keypoints: str | None = None, poses: str | None = None, table: dict | None = None,
                 style: PoseStyle = PoseStyle()):
        if keypoints and poses:
            raise ValueError("give --keypoints or --poses, not both")
        self.table, self.folder = dict(table or {}), Path(poses) if poses else None
        self.style = style
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"--poses {poses}: not a folder")
        if keypoints:
            from diffbody_jax.data.manifest import read_manifest

            for record in read_manifest(keypoints, decode=False):
                if record.keypoints is not None:
                    self.table[Path(record.image).stem] = (record.keypoints, record.keypoint_format)
        self.used = 0

    def __call__(self, photo, fitted, keypoint_size: tuple[int, int] | None = None) -> np.ndarray | None:
        """The pose map of `photo` in its fitted bucket. keypoint_size: the (H, W) the keypoints' pixels refer to
        (default the photo's; `diffbody eval` restores a bucket-sized copy of a larger ground truth, whose
        keypoints are in the original's pixels)."""
        from diffbody_jax.data.degradations import resize
        from diffbody_jax.pipelines.image_io import read_photo

        stem = photo.path.stem
        top, left, h, w = fitted.inner
        if stem in self.table:
            kp, fmt = self.table[stem]
            size = keypoint_size or photo.size
            kp = transform_keypoints(as_persons(kp, fmt), (h / size[0], w / size[1]), (-top, -left))
            self.used += 1
            return self.style.render(kp, fmt, fitted.bucket)
        if self.folder is not None:
            for path in sorted(self.folder.glob(f"{stem}.*")):
                pose = read_photo(path, min_size=1).pixels
                out = np.zeros((*fitted.bucket, 3), np.float32)
                out[top: top + h, left: left + w] = resize(pose, (h, w), "area")
                self.used += 1
                return out
        return None


def fit_photo(pixels: np.ndarray, settings):
    """A photo's pixels fitted as `settings.fit` says: into a bucket, or padded for tiles."""
    from diffbody_jax.pipelines.fit import fit_by_padding, fit_to_bucket

    return fit_by_padding(pixels, TILE_MULTIPLE) if settings.fit == "tile" else fit_to_bucket(pixels,
                                                                                               settings.buckets)


def prepare_jobs(files, out: Path, settings, prompts, poses: PoseSource, overwrite: bool):
    """(jobs, problems): each readable photo fitted to its bucket; a line for each input that cannot be restored."""
    from diffbody_jax.pipelines.image_io import PhotoError, read_photo

    jobs, problems, seen = [], [], {}
    for path, prompt in zip(files, prompts, strict=True):
        target = out / f"{path.stem}.png"
        if target in seen:
            problems.append(f"{path}: same output name as {seen[target]} ({target})")
            continue
        seen[target] = path
        if target.exists() and not overwrite:
            problems.append(f"{path}: {target} exists (pass --overwrite to replace it)")
            continue
        try:
            photo = read_photo(path)
        except PhotoError as e:
            problems.append(str(e))
            continue
        fitted = fit_photo(photo.pixels, settings)
        jobs.append(Job(photo, fitted, poses(photo, fitted), prompt, target))
    return jobs, problems


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def poses_and_masks(restorer, chunk: Sequence[Job], warn: Callable[[str], None] = _warn_on_stderr):
    """(pose maps [B, H, W, 3], person masks [B, H, W, 1] or None, I_reg or None) of a chunk. Jobs without a pose
    map get the annotator's on the regressed image, in the restorer's pose style (black without an annotator, or
    when it finds no person: `warn` is told, naming the photo); masks when I_attn comes from them. I_reg is returned
    when SwinIR ran here."""
    from diffbody_jax.pipelines.annotate import pose_and_mask

    poses = [job.pose for job in chunk]
    masks, i_reg = None, None
    annotator = restorer.annotator
    if annotator is not None and (restorer.needs_mask or any(p is None for p in poses)):
        i_reg = restorer.regress(np.stack([job.fitted.pixels for job in chunk]))
        masks = []
        for i, job in enumerate(chunk):
            pose, mask, annotation = pose_and_mask(annotator, i_reg[i], job.fitted.inner, job.photo.path.name,
                                                   restorer.pose_style)
            if annotation.num_persons == 0 and poses[i] is None:
                warn(f"{job.photo.path}: the annotator found no person; the pose map is empty")
            poses[i] = pose if poses[i] is None else poses[i]
            masks.append(mask)
    shape = chunk[0].fitted.pixels.shape
    empty = restorer.pose_style.render(None, "coco17", shape[:2])
    poses = np.stack([empty if p is None else p for p in poses])
    return poses, (np.stack(masks) if restorer.needs_mask and masks is not None else None), i_reg


def run_jobs(restorer, jobs: Sequence[Job], batch: int, seed: int,
             batch_done: Callable[[int], None] | None = None,
             warn: Callable[[str], None] = _warn_on_stderr) -> Iterator[tuple[Job, dict]]:
    """Restore every job, batched by bucket (the last chunk padded to `batch`); yields (job, outputs at the photo's
    size: "restored", the pipeline's intermediates and the "pose" map it was given) as each batch finishes. `warn`
    hears of photos whose pose map is empty because the annotator found no person."""
    import jax

    by_bucket: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        by_bucket.setdefault(job.fitted.bucket, []).append(job)
    key, n = jax.random.key(seed), 0
    for bucket_jobs in by_bucket.values():
        for start in range(0, len(bucket_jobs), batch):
            chunk = bucket_jobs[start: start + batch]
            poses, masks, i_reg = poses_and_masks(restorer, chunk, warn)
            out = restorer.restore(jax.random.fold_in(key, n), np.stack([j.fitted.pixels for j in chunk]), poses,
                                   [j.prompt for j in chunk], mask=masks, i_reg=i_reg, pad_to=batch)
            n += 1
            if batch_done is not None:
                batch_done(len(chunk))
            for i, job in enumerate(chunk):
                outputs = {k: v[i] if k == "caption" else job.fitted.unfit(v[i]) for k, v in out.items()}
                yield job, {**outputs, "pose": job.fitted.unfit(poses[i])}


def _side_by_side(*images: np.ndarray) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    padded = [np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0))) for i in images]
    return np.concatenate(padded, axis=1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image


def write_outputs(job: Job, outputs: dict, out: Path, overwrite: bool, intermediates: bool) -> None:
    """OUT/<name>.png, OUT/compare/<name>.png (input | restoration) and, with intermediates,
    OUT/intermediates/<name>_<what>.png."""
    from diffbody_jax.pipelines.image_io import write_png

    write_png(job.out, outputs["restored"], like=job.photo, overwrite=overwrite)
    (out / "compare").mkdir(exist_ok=True)
    write_png(out / "compare" / job.out.name, _side_by_side(job.photo.pixels, outputs["restored"]), overwrite=True)
    if intermediates:
        (out / "intermediates").mkdir(exist_ok=True)
        for name, image in outputs.items():
            if name == "caption":  # stage 2's prompt, re-captioned from I_res
                (out / "intermediates" / f"{job.out.stem}_caption.txt").write_text(image + "\n")
            elif name != "restored":
                write_png(out / "intermediates" / f"{job.out.stem}_{name}.png", _as_rgb(image), overwrite=True)
