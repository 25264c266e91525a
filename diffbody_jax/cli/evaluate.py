"""`diffbody eval`: restore seeded degradations of ground-truth photos and score them (Table 1 of DiffBody v2).

  diffbody eval GT_DIR --weights weights/ --out eval/ [--version v1|v2] [--mixtures all|NAME,...] [--seed 0]
      [--size 512] [--steps N] [--sampler ...] [--batch B] [--save-images]

Each ground-truth photo is first scaled into its resolution bucket (the size the models restore at; the
reflected border of `--fit bucket` is excluded from every score); that is the reference (with `--fit tile`, the
photo at its own size). Each of the five Table-1
mixtures degrades it (one numpy generator per (mixture, photo), seeded from --seed: the same inputs on every run),
the version restores it, and PSNR / SSIM (on BT.601 luma) and CPSNR / CSSIM (on RGB) are measured by
`diffbody_jax.evaluation.metrics` (tested against scikit-image within 1e-4) for the degraded input, SwinIR's I_ir
and the restoration. Writes OUT/metrics.json (per photo and mean per mixture) and OUT/metrics.md (the table).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from diffbody_jax.cli.restore import Job, PoseSource, add_restore_args, annotator_from, run_jobs, settings_from

SCORED = ("degraded", "swinir", "restored")


def evaluation_jobs(photos, mixture: str, seed: int, settings, prompts, poses: PoseSource, index_of_mixture: int):
    """(jobs, references): per photo, its bucket-sized reference and a job restoring its degraded version."""
    from diffbody_jax.cli.restore import TILE_MULTIPLE
    from diffbody_jax.data.degradations import table1_mixture
    from diffbody_jax.pipelines.fit import fit_by_padding, fit_to_bucket
    from diffbody_jax.pipelines.image_io import Photo

    degrade = table1_mixture(mixture)
    jobs, references = [], []
    for n, (photo, prompt) in enumerate(zip(photos, prompts, strict=True)):
        if settings.fit == "tile":  # scored at the photo's own size
            reference = photo.pixels
        else:
            fitted = fit_to_bucket(photo.pixels, settings.buckets)
            top, left, h, w = fitted.inner
            reference = fitted.pixels[top: top + h, left: left + w]
        rng = np.random.default_rng([seed, index_of_mixture, n])
        degraded = degrade(reference, rng).upsampled.astype(np.float32)
        small = Photo(photo.path, degraded)
        refit = (fit_by_padding(degraded, TILE_MULTIPLE) if settings.fit == "tile"
                 else fit_to_bucket(degraded, settings.buckets))
        jobs.append(Job(small, refit, poses(small, refit), prompt, Path(photo.path.name)))
        references.append(reference)
    return jobs, references


def score(images: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, dict[str, float]]:
    from diffbody_jax.evaluation.metrics import image_metrics

    out = {}
    for name, image in images.items():
        m = image_metrics(np.asarray(image, np.float32)[None], np.asarray(reference, np.float32)[None])
        out[name] = {k: float(v[0]) for k, v in m.items()}
    return out


def markdown_table(means: dict[str, dict[str, dict[str, float]]], version: str, count: int) -> str:
    lines = [f"Restoration quality, DiffBody {version}, {count} photo(s) per mixture (mean). PSNR/SSIM on Y "
             "(BT.601), CPSNR/CSSIM on RGB.", "",
             "| mixture | input PSNR | input SSIM | SwinIR PSNR | SwinIR SSIM | PSNR | SSIM | CPSNR | CSSIM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mixture, m in means.items():
        d, s, r = m["degraded"], m["swinir"], m["restored"]
        lines.append(f"| {mixture} | {d['psnr']:.2f} | {d['ssim']:.4f} | {s['psnr']:.2f} | {s['ssim']:.4f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['cpsnr']:.2f} | {r['cssim']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt", nargs="+", help="ground-truth image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--mixtures", default="all", help="all, or Table-1 mixture names separated by commas")
    p.add_argument("--save-images", action="store_true", help="also write each mixture's degraded and restored PNGs")
    p.add_argument("--quiet", action="store_true")
    add_restore_args(p)
    args = p.parse_args(argv)

    from diffbody_jax.annotators import AnnotatorError
    from diffbody_jax.data.degradations import TABLE1_MIXTURES
    from diffbody_jax.files import write_json
    from diffbody_jax.pipelines.image_io import find_images, read_photos, write_png
    from diffbody_jax.pipelines.prompts import prompts_for
    from diffbody_jax.pipelines.restore import Restorer
    from diffbody_jax.pipelines.weights import WeightsError

    def fail(message: str) -> int:
        print(f"diffbody eval: {message}", file=sys.stderr)
        return 1

    mixtures = list(TABLE1_MIXTURES) if args.mixtures == "all" else args.mixtures.split(",")
    unknown = [m for m in mixtures if m not in TABLE1_MIXTURES]
    if unknown:
        return fail(f"--mixtures: unknown {unknown}; known: {', '.join(TABLE1_MIXTURES)}")
    try:
        settings = settings_from(args)
        files, problems = find_images(args.gt)
        photos, bad = read_photos(files)
        problems += bad
        prompts, _ = prompts_for([ph.path for ph in photos], args.prompt, args.prompts)
        poses = PoseSource(args.keypoints, args.poses)
        annotator, _ = annotator_from(args.annotator)
    except (ValueError, FileNotFoundError, AnnotatorError) as e:
        return fail(str(e))
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    if not photos:
        return fail("no ground-truth image to evaluate on")
    try:
        restorer = Restorer(args.weights, settings, annotator=annotator)
    except (WeightsError, ValueError) as e:
        return fail(str(e))
    intermediate = "i_reg" if settings.version == "v1" else "i_ir"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_photo, means, start = {}, {}, time.perf_counter()
    for m_index, mixture in enumerate(mixtures):
        jobs, references = evaluation_jobs(photos, mixture, args.seed, settings, prompts, poses, m_index)
        rows, reference_of = {}, {id(j): r for j, r in zip(jobs, references, strict=True)}
        for job, outputs in run_jobs(restorer, jobs, args.batch, args.seed):
            reference = reference_of[id(job)]
            images = {"degraded": job.photo.pixels, "swinir": outputs[intermediate], "restored": outputs["restored"]}
            rows[job.photo.path.name] = score(images, reference)
            if args.save_images:
                for name in ("degraded", "restored"):
                    write_png(out / mixture / name / f"{job.photo.path.stem}.png", images[name], overwrite=True)
        per_photo[mixture] = rows
        means[mixture] = {what: {k: float(np.mean([r[what][k] for r in rows.values()])) for k in
                                 ("psnr", "ssim", "cpsnr", "cssim")} for what in SCORED}
        if not args.quiet:
            r = means[mixture]["restored"]
            print(f"{mixture}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} CPSNR {r['cpsnr']:.2f} CSSIM {r['cssim']:.4f}")
    write_json({"version": settings.version, "steps": settings.num_steps, "sampler": settings.sampler,
                "seed": args.seed, "size": settings.size, "photos": [ph.path.name for ph in photos],
                "mean": means, "per_photo": per_photo}, out / "metrics.json")
    (out / "metrics.md").write_text(markdown_table(means, settings.version, len(photos)))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'} ({len(photos)} photo(s) x {len(mixtures)} "
          f"mixture(s) in {time.perf_counter() - start:.1f} s); {len(problems)} skipped")
    return 1 if problems else 0
