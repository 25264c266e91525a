"""What a trained zoo restores, on its held-out photos: the measurements of docs/zoo.md's quality tables.

    python bench/zoo_quality.py ZOO [--parts vae,table1,samplers,guidance,cfg] [--seed 0] [--json OUT.json]

ZOO is a `diffbody zoo` folder (ZOO/weights, ZOO/data/held_out.jsonl). Every restoration runs through
`diffbody eval`'s own function (`evaluation.table1.evaluate`) at the demo's size (64 x 64 square bucket): each
Table-1 mixture degrades the held-out photo (seeded), the version restores it, and PSNR / SSIM (BT.601 luma) and
CPSNR / CSSIM (RGB) score the degraded input, SwinIR's output and the restoration. Parts:

  vae       each VAE's reconstruction of the clean photos (sd21/vae, sdxl/vae): the bound of v1 and v2
  table1    v1 and v2 at the papers' presets (DDPM 50 / 2 x 200) on the five mixtures
  samplers  DDPM at the preset against DDIM 20 and DPM++(2M) 20: mean over the mixtures, and seconds per image
            after compiling (mean over mixtures 2-5: the first one compiles)
  guidance  v1's part-loss guidance scale s: the part loss (Eq. 6) of the restoration against I_reg, and PSNR
  cfg       classifier-free guidance off (1) against on (--cfg-scale), both versions, the preset sampler
  posterior K samples (--samples, one batch) of each version per mixture from different noise: the mean score of a
            sample and the score of the samples' mean, which approaches the model's E[x | input] (the MMSE
            estimate). For exact posterior samples the expected squared error of one sample is twice the mean's
            (E|X' - X|^2 = 2 Var for X, X' independent given the input), so a sample scores about 3 dB under what
            the model knows; the mean shows that knowledge (docs/zoo.md, "the yardstick")

Not timed as a benchmark against torch (it has none); the seconds are this machine's, for the trade-off.
Full run: about 40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.data.degradations import TABLE1_MIXTURES
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.diffusion.part_guidance import part_loss
from diffbody_jax.evaluation.metrics import image_metrics
from diffbody_jax.evaluation.table1 import METRICS, SCORED, evaluate, evaluation_jobs, score
from diffbody_jax.models.vae import images_to_latents, latents_to_images
from diffbody_jax.pipelines.image_io import read_photos
from diffbody_jax.pipelines.jobs import PoseSource, fit_photo, run_jobs
from diffbody_jax.pipelines.restore import PRESET_STEPS, Restorer, RestoreSettings
from diffbody_jax.pipelines.weights import load_component

SIZE = 64
MIXTURES = list(TABLE1_MIXTURES)
GUIDANCE_SCALES = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)


class HeldOutPhotos:
    def __init__(self, zoo: Path):
        self.manifest = zoo / "data" / "held_out.jsonl"
        records = read_manifest(self.manifest, decode=False)
        self.photos, bad = read_photos([Path(r.image) for r in records])
        if bad or not self.photos:
            raise SystemExit(f"{self.manifest}: no readable held-out photo ({bad})")
        captions = {Path(r.image).stem: r.caption for r in records}
        self.prompts = [captions[p.path.stem] or "" for p in self.photos]


    def inputs(self, restorer: Restorer) -> tuple[list[str], PoseSource]:
        """The photos' prompts (the restorer's default for an empty caption) and poses, in the restorer's style."""
        return ([p or restorer.default_prompt for p in self.prompts],
                PoseSource(str(self.manifest), style=restorer.pose_style))


def run(restorer: Restorer, held: HeldOutPhotos, seed: int, on_image=None) -> dict:
    """evaluate() over the five mixtures, plus the mean over them and "seconds_per_image" (the mixtures after the
    first, which compiles)."""
    prompts, poses = held.inputs(restorer)
    marks = [time.perf_counter()]
    result = evaluate(restorer, held.photos, prompts, poses, MIXTURES, seed, batch=1, on_image=on_image,
                      on_mixture=lambda *_: marks.append(time.perf_counter()))
    result["seconds_per_image"] = float(np.mean(np.diff(marks)[1:])) / len(held.photos)
    result["mean_over_mixtures"] = {
        what: {k: float(np.mean([result["mean"][m][what][k] for m in MIXTURES])) for k in METRICS}
        for what in SCORED}
    return result


def posterior(restorer: Restorer, held: HeldOutPhotos, seed: int, samples: int) -> dict:
    """{mixture: {"degraded", "swinir", "sample" (mean over samples), "mean of samples": {metric: value}}}, mean over
    the held-out photos; every photo's samples are one batch (one noise draw each)."""
    prompts, poses = held.inputs(restorer)
    intermediate = restorer.pipeline.intermediates[0]
    out = {}
    for m_index, mixture in enumerate(MIXTURES):
        jobs, references = evaluation_jobs(held.photos, mixture, seed, restorer.settings, prompts, poses, m_index)
        rows = []
        for job, reference in zip(jobs, references, strict=True):
            outputs = [o for _, o in run_jobs(restorer, [job] * samples, batch=samples, seed=seed)]
            restored = np.stack([o["restored"] for o in outputs])
            each = [score({"s": r}, reference)["s"] for r in restored]
            row = score({"degraded": job.photo.pixels, "swinir": outputs[0][intermediate],
                         "mean of samples": restored.mean(0)}, reference)
            row["sample"] = {k: float(np.mean([e[k] for e in each])) for k in METRICS}
            rows.append(row)
        out[mixture] = {what: {k: float(np.mean([r[what][k] for r in rows])) for k in METRICS} for what in rows[0]}
    return out


def vae_bound(weights: Path, held: HeldOutPhotos) -> dict:
    """{component: metrics} of each VAE's reconstruction of the clean photos, in the bucket the restorers use."""
    settings = RestoreSettings(version="v1", size=SIZE, square_only=True)
    out = {}
    for component in ("sd21/vae", "sdxl/vae"):
        vae, variables = load_component(weights, component)
        rows = []
        for photo in held.photos:
            fitted = fit_photo(photo.pixels, settings)
            top, left, h, w = fitted.inner
            z = images_to_latents(vae, variables["params"], jnp.asarray(fitted.pixels[None]))
            recon = np.asarray(latents_to_images(vae, variables["params"], z))
            m = image_metrics(recon[:, top: top + h, left: left + w], fitted.pixels[None, top: top + h, left: left + w])
            rows.append({k: float(v[0]) for k, v in m.items()})
        out[component] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def table(rows: list[tuple[str, dict]], extra: str = "") -> str:
    head = "| | PSNR | SSIM | CPSNR | CSSIM |" + (f" {extra} |" if extra else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, m in rows:
        cells = " | ".join(f"{m[k]:.{2 if 'psnr' in k else 4}f}" for k in ("psnr", "ssim", "cpsnr", "cssim"))
        lines.append(f"| {name} | {cells} |" + (f" {m[extra]:.3g} |" if extra else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--parts", default="vae,table1,samplers,guidance,cfg,posterior")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--versions", default="v1,v2", help="the versions to restore with")
    parser.add_argument("--samples", type=int, default=8, help="posterior: samples per photo and mixture")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    parts, weights, held = args.parts.split(","), args.zoo / "weights", HeldOutPhotos(args.zoo)
    versions = args.versions.split(",")
    out: dict = {"zoo": str(args.zoo), "photos": [p.path.name for p in held.photos], "size": SIZE}
    print(f"{len(held.photos)} held-out photo(s) at {SIZE} px, mixtures {MIXTURES}, seed {args.seed}\n", flush=True)

    def restorer(version, **kw):
        return Restorer(weights, RestoreSettings(version=version, size=SIZE, square_only=True, **kw))

    if "vae" in parts:
        out["vae"] = vae_bound(weights, held)
        print("VAE reconstruction of the clean photos (the bound of v1 and v2)\n" + table(list(out["vae"].items())))
    presets = {}
    if "table1" in parts or "samplers" in parts:
        for version in versions:
            presets[version] = run(restorer(version), held, args.seed)
        out["table1"] = {v: r["mean"] for v, r in presets.items()}
        for m in MIXTURES:
            first = presets[versions[0]]["mean"][m]
            rows = [("degraded", first["degraded"]), ("SwinIR", first["swinir"])]
            rows += [(f"{v} (DDPM {'2 x ' if v == 'v2' else ''}{PRESET_STEPS[v]})", presets[v]["mean"][m]["restored"])
                     for v in versions]
            print(f"\n{m}\n" + table(rows), flush=True)
    if "samplers" in parts:
        rows = []
        for version in versions:
            p = presets[version]
            rows.append((f"{version} DDPM {PRESET_STEPS[version]}",
                         {**p["mean_over_mixtures"]["restored"], "s": p["seconds_per_image"]}))
            for sampler in ("ddim", "dpmpp"):
                r = run(restorer(version, sampler=sampler, steps=20), held, args.seed)
                rows.append((f"{version} {sampler} 20", {**r["mean_over_mixtures"]["restored"],
                                                          "s": r["seconds_per_image"]}))
        out["samplers"] = dict(rows)
        print("\nSamplers (mean over the mixtures; s: seconds per image, compiled)\n" + table(rows, "s"), flush=True)
    if "guidance" in parts:
        rows = []
        for scale in GUIDANCE_SCALES:
            guided, losses = restorer("v1", guidance=scale), []
            net = guided.pipeline.group.bodypart
            net_variables = guided.pipeline.group.member_variables(guided.variables, "bodypart")

            def record(mixture, job, images, losses=losses, net=net, net_variables=net_variables):
                losses.append(float(part_loss(net, net_variables, jnp.asarray(images["restored"][None]),
                                              jnp.asarray(images["swinir"][None]))))

            result = run(guided, held, args.seed, record)
            rows.append((f"s = {scale:g}", {**result["mean_over_mixtures"]["restored"],
                                            "part loss": float(np.mean(losses))}))
        out["guidance"] = dict(rows)
        print("\nv1 part-loss guidance (DDPM 50; part loss of the restoration against I_reg, Eq. 6)\n"
              + table(rows, "part loss"), flush=True)
    if "cfg" in parts:
        rows = []
        for version in versions:
            for scale in (1.0, args.cfg_scale):
                reuse = scale == 1.0 and version in presets
                r = presets[version] if reuse else run(restorer(version, cfg=scale), held, args.seed)
                rows.append((f"{version} cfg {scale:g}", r["mean_over_mixtures"]["restored"]))
        out["cfg"] = dict(rows)
        print("\nClassifier-free guidance (mean over the mixtures, the preset sampler)\n" + table(rows), flush=True)
    if "posterior" in parts:
        out["posterior"] = {}
        for v in versions:
            out["posterior"][v] = result = posterior(restorer(v), held, args.seed, args.samples)
            for m in MIXTURES:
                print(f"\nposterior, {v}, {m}\n" + table([
                    ("degraded", result[m]["degraded"]), ("SwinIR", result[m]["swinir"]),
                    ("one sample (mean score)", result[m]["sample"]),
                    (f"mean of {args.samples} samples", result[m]["mean of samples"])]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()
