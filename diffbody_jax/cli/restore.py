"""`diffbody restore`: restore photos of people from a weights folder; `diffbody weights check`: what a weights folder
holds and what each version still needs.

  diffbody restore photos/ --out restored/ --weights weights/ [--version v1|v2] [--prompt TEXT | --prompts FILE]
      [--keypoints MANIFEST.jsonl | --poses DIR] [--annotator auto|none|mediapipe|onnx-dwpose:det=..,pose=..]
      [--steps N] [--sampler ddpm|ddim|dpmpp] [--cfg S] [--guidance S]
      [--seed K] [--batch B] [--size 512] [--fit bucket] [--colour none|adain|wavelet] [--save-intermediates]
      [--overwrite]
  diffbody weights check weights/

Writes OUT/<input name>.png (8-bit, EXIF orientation applied, ICC profile and alpha kept) and
OUT/compare/<name>.png (input | restoration side by side); with --save-intermediates OUT/intermediates/<name>_<what>.png
(v1: i_reg, attention; v2: i_ir, i_res, depth, normal). A bad input (unreadable, truncated, not an image, too small,
an existing output without --overwrite) gets one line naming the file and the problem; the others are restored; the
exit code is 1 if any input failed. The pose map comes from --keypoints (a manifest whose `image` names match the
inputs) or --poses (pose images named like the inputs); for the other photos, from --annotator run on the regressed
image (I_reg / I_ir, as the papers do; "auto": mediapipe when the annotators extra is installed), or black with
--annotator none. v1 weights without the body-part network take I_attn from the annotator's person mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from diffbody_jax.pipelines.restore import FITS, PRESET_STEPS, SAMPLERS, RestoreSettings


def add_restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="weights folder (diffbody weights check DIR describes it)")
    p.add_argument("--version", choices=("v1", "v2"), default="v1")
    p.add_argument("--prompt", help="one prompt for every image (default: a generic photo-of-a-person prompt)")
    p.add_argument("--prompts", help="per-image prompts: a JSON object or `name<TAB>prompt` lines")
    p.add_argument("--negative-prompt", default=RestoreSettings.negative_prompt)
    p.add_argument("--steps", type=int, help=f"sampling steps (default: the papers' {PRESET_STEPS})")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--guidance", type=float, default=0.0, help="v1 part-loss guidance scale (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images per jitted call (split over the local devices)")
    p.add_argument("--size", type=int, default=512,
                   help="side of the square bucket, or of a tile with --fit tile (multiple of 64)")
    p.add_argument("--fit", choices=FITS, default="bucket",
                   help="bucket: scale into the nearest bucket and back; tile: the photo's own size, on tiles")
    p.add_argument("--colour", choices=("none", "adain", "wavelet"), default="none")
    p.add_argument("--keypoints", help="a manifest (JSONL) with keypoints for the inputs, matched by file name")
    p.add_argument("--poses", help="a folder of pose maps named like the inputs")
    p.add_argument("--annotator", default="auto",
                   help="pose for photos without keypoints: auto | none | mediapipe | onnx-dwpose:det=FILE,pose=FILE")


def annotator_from(spec: str):
    """(annotator or None, note or None) for --annotator; "auto" without an installed annotator is None + a note."""
    from diffbody_jax.annotators import annotator_from_spec
    from diffbody_jax.annotators.mediapipe_pose import available

    if spec == "none":
        return None, None
    if spec == "auto" and not available():
        return None, ("no annotator installed (the annotators extra): photos without --keypoints / --poses get "
                      "black pose maps")
    return annotator_from_spec(spec), None


def settings_from(args) -> RestoreSettings:
    return RestoreSettings(version=args.version, steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                           guidance=args.guidance, colour=args.colour, size=args.size,
                           negative_prompt=args.negative_prompt, fit=args.fit)


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
    photo's pixels, format)}."""

    def __init__(self, keypoints: str | None = None, poses: str | None = None, table: dict | None = None):
        if keypoints and poses:
            raise ValueError("give --keypoints or --poses, not both")
        self.table, self.folder = dict(table or {}), Path(poses) if poses else None
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"--poses {poses}: not a folder")
        if keypoints:
            from diffbody_jax.data.manifest import read_manifest

            for record in read_manifest(keypoints, decode=False):
                if record.keypoints is not None:
                    self.table[Path(record.image).stem] = (record.keypoints, record.keypoint_format)
        self.used = 0

    def __call__(self, photo, fitted) -> np.ndarray | None:
        from diffbody_jax.data.degradations import resize
        from diffbody_jax.data.pose import as_persons, render_pose, transform_keypoints
        from diffbody_jax.pipelines.image_io import read_photo

        stem = photo.path.stem
        if stem in self.table:
            kp, fmt = self.table[stem]
            top, left, h, w = fitted.inner
            scale = (h / photo.size[0], w / photo.size[1])
            kp = transform_keypoints(as_persons(kp, fmt), scale, (-top, -left))
            self.used += 1
            return render_pose(kp, fmt, fitted.bucket).astype(np.float32) / 255.0
        if self.folder is not None:
            for path in sorted(self.folder.glob(f"{stem}.*")):
                pose = read_photo(path, min_size=1).pixels
                top, left, h, w = fitted.inner
                out = np.zeros((*fitted.bucket, 3), np.float32)
                out[top: top + h, left: left + w] = resize(pose, (h, w), "area")
                self.used += 1
                return out
        return None


def _side_by_side(*images: np.ndarray) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    padded = [np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0))) for i in images]
    return np.concatenate(padded, axis=1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image


class ProgressBars:
    """tqdm bars over images and over the sampling steps of the running batch (hooked into the scan)."""

    def __init__(self, total_images: int, steps: int, enabled: bool = True):
        from tqdm import tqdm

        self.images = tqdm(total=total_images, desc="images", unit="img", disable=not enabled, position=0)
        self.steps = tqdm(total=steps, desc="steps", unit="step", disable=not enabled, position=1, leave=False)

    def on_step(self, stage, index) -> None:
        if int(index) == 0:
            self.steps.reset()
            self.steps.set_description(f"stage {int(stage)} steps")
        self.steps.update(1)

    def batch_done(self, n: int) -> None:
        self.images.update(n)

    def close(self) -> None:
        self.steps.close()
        self.images.close()


def prepare_jobs(files, out: Path, settings: RestoreSettings, prompts, poses: PoseSource, overwrite: bool):
    """(jobs, problems): each readable photo fitted to its bucket; a line for each input that cannot be restored."""
    from diffbody_jax.pipelines.fit import fit_by_padding, fit_to_bucket
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
        fitted = (fit_by_padding(photo.pixels, TILE_MULTIPLE) if settings.fit == "tile"
                  else fit_to_bucket(photo.pixels, settings.buckets))
        jobs.append(Job(photo, fitted, poses(photo, fitted), prompt, target))
    return jobs, problems


def poses_and_masks(restorer, chunk):
    """The chunk's pose maps [B, H, W, 3] and person masks [B, H, W, 1] or None. Jobs without a pose map get the
    annotator's on the regressed image (black without an annotator); masks when v1 lacks the part network."""
    from diffbody_jax.pipelines.annotate import pose_and_mask

    poses = [job.pose for job in chunk]
    masks = None
    annotator = restorer.annotator
    if annotator is not None and (restorer.needs_mask or any(p is None for p in poses)):
        i_reg = restorer.regress(np.stack([job.fitted.pixels for job in chunk]))
        masks = []
        for i, job in enumerate(chunk):
            pose, mask, annotation = pose_and_mask(annotator, i_reg[i], job.fitted.inner, job.photo.path.name)
            if annotation.num_persons == 0 and poses[i] is None:
                print(f"warning: {job.photo.path}: the annotator found no person; the pose map is black",
                      file=sys.stderr)
            poses[i] = pose if poses[i] is None else poses[i]
            masks.append(mask)
    shape = chunk[0].fitted.pixels.shape
    poses = np.stack([np.zeros(shape, np.float32) if p is None else p for p in poses])
    return poses, (np.stack(masks) if restorer.needs_mask and masks is not None else None)


def run_jobs(restorer, jobs, batch: int, seed: int, bars: ProgressBars | None = None):
    """Restore every job, batched by bucket; yields (job, outputs at the photo's size) as each batch finishes."""
    import jax

    by_bucket: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        by_bucket.setdefault(job.fitted.bucket, []).append(job)
    key, n = jax.random.key(seed), 0
    for bucket_jobs in by_bucket.values():
        for start in range(0, len(bucket_jobs), batch):
            chunk = bucket_jobs[start: start + batch]
            poses, masks = poses_and_masks(restorer, chunk)
            out = restorer.restore(jax.random.fold_in(key, n), np.stack([j.fitted.pixels for j in chunk]), poses,
                                   [j.prompt for j in chunk], mask=masks)
            n += 1
            if bars is not None:
                bars.batch_done(len(chunk))
            for i, job in enumerate(chunk):
                yield job, {k: job.fitted.unfit(v[i]) for k, v in out.items()}


def write_outputs(job, outputs: dict, out: Path, overwrite: bool, intermediates: bool) -> None:
    from diffbody_jax.pipelines.image_io import write_png

    write_png(job.out, outputs["restored"], like=job.photo, overwrite=overwrite)
    (out / "compare").mkdir(exist_ok=True)
    write_png(out / "compare" / job.out.name, _side_by_side(job.photo.pixels, outputs["restored"]), overwrite=True)
    if intermediates:
        (out / "intermediates").mkdir(exist_ok=True)
        for name, image in outputs.items():
            if name != "restored":
                write_png(out / "intermediates" / f"{job.out.stem}_{name}.png", _as_rgb(image), overwrite=True)


def restore_main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and folders of images")
    p.add_argument("--out", required=True)
    add_restore_args(p)
    p.add_argument("--save-intermediates", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from diffbody_jax.annotators import AnnotatorError
    from diffbody_jax.pipelines.image_io import find_images
    from diffbody_jax.pipelines.prompts import prompts_for
    from diffbody_jax.pipelines.restore import Restorer
    from diffbody_jax.pipelines.weights import WeightsError

    def fail(message: str) -> int:
        print(f"diffbody restore: {message}", file=sys.stderr)
        return 1

    if args.batch < 1:
        return fail(f"--batch {args.batch}: must be at least 1")
    try:
        settings = settings_from(args)
        files, problems = find_images(args.inputs)
        prompts, notes = prompts_for(files, args.prompt, args.prompts)
        poses = PoseSource(args.keypoints, args.poses)
        annotator, annotator_note = annotator_from(args.annotator)
    except (ValueError, FileNotFoundError, AnnotatorError) as e:
        return fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, bad = prepare_jobs(files, out, settings, prompts, poses, args.overwrite)
    problems += bad
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    for job in jobs:
        for note in job.photo.notes:
            print(f"note: {job.photo.path}: {note}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if jobs and annotator_note and poses.used < len(jobs):
        print(f"note: {annotator_note}", file=sys.stderr)
    if not jobs:
        return fail("no image to restore" + (f" ({len(problems)} skipped)" if problems else ""))
    bars = ProgressBars(len(jobs), settings.num_steps, enabled=not args.quiet)
    try:
        restorer = Restorer(args.weights, settings, on_step=bars.on_step, annotator=annotator)
    except (WeightsError, ValueError) as e:
        bars.close()
        return fail(str(e))
    start, written = time.perf_counter(), 0
    try:
        for job, outputs in run_jobs(restorer, jobs, args.batch, args.seed, bars):
            write_outputs(job, outputs, out, args.overwrite, args.save_intermediates)
            written += 1
    finally:
        bars.close()
    seconds = time.perf_counter() - start
    print(f"restored {written} image(s) into {out} in {seconds:.1f} s ({settings.version}, {settings.sampler} "
          f"{settings.num_steps} steps, {restorer.num_devices} device(s)); {len(problems)} failed")
    return 1 if problems else 0


def weights_main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list the components of a weights folder and what each version needs")
    check.add_argument("folder")
    check.add_argument("--configs-only", action="store_true", help="read configs, not tensors (fast)")
    args = p.parse_args(argv)

    from diffbody_jax.pipelines.weights import COMPONENTS, OPTIONAL, WeightsError, check_weights

    try:
        reports, needs = check_weights(args.folder, load=not args.configs_only)
    except WeightsError as e:
        print(f"diffbody weights check: {e}", file=sys.stderr)
        return 1
    for r in reports:
        if not r.present:
            state = "missing"
        elif r.problem:
            state = f"BROKEN: {r.problem}"
        else:
            state = f"ok  {r.class_name}, {r.num_params:,} params" if r.class_name else "present"
        print(f"{r.name:<22} {state}")
    ok = {r.name for r in reports if r.present and not r.problem}
    for version, missing in needs.items():
        absent = [n for n in OPTIONAL[version] if n not in ok]
        print(f"{version}: " + ("ready" if not missing else "needs " + ", ".join(
            f"{n} ({COMPONENTS[n].source})" for n in missing))
            + "".join(f"; without {n}: I_attn from the annotator's person mask, no part-loss guidance"
                      for n in absent if n == "bodypart"))
    return 1 if any(r.problem for r in reports) else 0
