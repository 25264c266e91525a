"""Table 1 of DiffBody v2: restore seeded degradations of ground-truth photos and score them.

    result = evaluate(restorer, photos, prompts, poses, mixtures=TABLE1_MIXTURES, seed=0, batch=1)
    result["mean"]["bicubic-x4"]["restored"]["psnr"]

Each ground-truth photo is first scaled into its resolution bucket (the size the models restore at; the reflected
border of `--fit bucket` is excluded from every score); that is the reference (with `--fit tile`, the photo at its
own size). Each mixture degrades it (one numpy generator per (mixture, photo), seeded from `seed`: the same inputs
on every run), the restorer restores it, and PSNR / SSIM (on BT.601 luma) and CPSNR / CSSIM (on RGB) are measured
by `evaluation.metrics` for the degraded input, SwinIR's output and the restoration. Given keypoints are in the
original photo's pixels: they are scaled to the reference the degraded copy is made from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diffbody_jax.data.degradations import table1_mixture
from diffbody_jax.evaluation.quality import METRICS as METRIC_INFO
from diffbody_jax.evaluation.quality import PRIOR_ERRORS, MetricSet
from diffbody_jax.pipelines.image_io import Photo
from diffbody_jax.pipelines.jobs import Job, PoseSource, fit_photo, run_jobs

SCORED = ("degraded", "swinir", "restored")
METRICS = ("psnr", "ssim", "cpsnr", "cssim")


def reference_of(photo, settings) -> np.ndarray:
    """The photo as the models restore it: its part of the nearest bucket (or the photo itself, tiled)."""
    if settings.fit == "tile":
        return photo.pixels
    fitted = fit_photo(photo.pixels, settings)
    top, left, h, w = fitted.inner
    return fitted.pixels[top: top + h, left: left + w]


def evaluation_jobs(photos, mixture: str, seed: int, settings, prompts, poses: PoseSource, index_of_mixture: int):
    """(jobs, references): per photo, its bucket-sized reference and a job restoring its degraded version."""
    degrade = table1_mixture(mixture)
    jobs, references = [], []
    for n, (photo, prompt) in enumerate(zip(photos, prompts, strict=True)):
        reference = reference_of(photo, settings)
        rng = np.random.default_rng([seed, index_of_mixture, n])
        degraded = degrade(reference, rng).upsampled.astype(np.float32)
        small = Photo(photo.path, degraded)
        refit = fit_photo(degraded, settings)
        # the keypoints are in the ground truth's pixels: scaled from its size to the reference's place in refit
        jobs.append(Job(small, refit, poses(small, refit, keypoint_size=photo.size), prompt, Path(photo.path.name)))
        references.append(reference)
    return jobs, references


def score(images: dict[str, np.ndarray], reference: np.ndarray,
          metrics: MetricSet | None = None) -> dict[str, dict[str, float]]:
    """{image name: {metric: value}} against the reference, the images as one batch; metrics None: PSNR, SSIM,
    CPSNR, CSSIM."""
    metrics = metrics or MetricSet(list(METRICS))
    return dict(zip(images, metrics.score_many(list(images.values()), reference), strict=True))


def evaluate(restorer, photos: Sequence[Photo], prompts: Sequence[str], poses: PoseSource, mixtures: Sequence[str],
             seed: int, batch: int, on_image: Callable[[str, Job, dict], None] | None = None,
             on_mixture: Callable[[str, dict], None] | None = None, metrics: MetricSet | None = None) -> dict:
    """{"mean": {mixture: {degraded|swinir|restored: {metric: value}}}, "per_photo": {mixture: {name: ...}}}.
    on_image(mixture, job, images) sees each photo's reference / degraded / swinir / restored arrays (and v2's depth
    and normal maps) to save them. metrics: what is scored (None: PSNR, SSIM, CPSNR, CSSIM); with its depth /
    normal estimators and a v2 restorer, the restoration's entry also has stage 1's prior errors ("depth_l2",
    "normal_l2")."""
    intermediate = restorer.pipeline.intermediates[0]  # I_reg (v1) / I_ir (v2): SwinIR's output
    per_photo, means = {}, {}
    for m_index, mixture in enumerate(mixtures):
        jobs, references = evaluation_jobs(photos, mixture, seed, restorer.settings, prompts, poses, m_index)
        rows, reference_by_job = {}, {id(j): r for j, r in zip(jobs, references, strict=True)}
        for job, outputs in run_jobs(restorer, jobs, batch, seed):
            reference = reference_by_job[id(job)]
            images = {"degraded": job.photo.pixels, "swinir": outputs[intermediate], "restored": outputs["restored"]}
            rows[job.photo.path.name] = row = score(images, reference, metrics)
            if metrics is not None:
                row["restored"].update(metrics.prior_errors(outputs.get("depth"), outputs.get("normal"), reference))
            if on_image is not None:
                priors = {k: outputs[k] for k in ("depth", "normal") if k in outputs}  # v2's stage-1 maps
                on_image(mixture, job, {**images, "reference": reference, **priors})
        per_photo[mixture] = rows
        means[mixture] = {what: {k: float(np.mean([r[what][k] for r in rows.values()]))
                                 for k in next(iter(rows.values()))[what]} for what in SCORED}
        if on_mixture is not None:
            on_mixture(mixture, means[mixture])
    return {"mean": means, "per_photo": per_photo}


def markdown_table(means: dict[str, dict[str, dict[str, float]]], version: str, count: int) -> str:
    """The v2 paper's Table 1 layout: a row per (mixture, method), a column per metric with its arrow (up: higher is
    better, down: lower); methods are the degraded input, SwinIR's output and the restoration. The prior errors
    (v2, with estimators) are columns that only the restoration fills."""
    first = next(iter(means.values()))
    names = list(first["restored"])
    info = {**METRIC_INFO, **PRIOR_ERRORS}
    header = [f"{info[n].label} {'↑' if info[n].higher_is_better else '↓'}" for n in names]
    lines = [f"Restoration quality, DiffBody {version}, mean over {count} photo(s) per mixture. PSNR / SSIM on Y "
             "(BT.601), CPSNR / CSSIM on RGB; ↑ higher is better, ↓ lower.", "",
             "| degradation | method | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(names)]
    methods = {"degraded": "input", "swinir": "SwinIR", "restored": f"DiffBody {version}"}
    for mixture, m in means.items():
        for what, method in methods.items():
            cells = [_cell(n, m[what].get(n)) for n in names]
            lines.append(f"| {mixture} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if name in ("psnr", "cpsnr") else f"{value:.4f}"
