"""`diffbody demo`: the whole tool on this machine in a few minutes, no downloads.

  diffbody demo [--out demo] [--train-steps 400] [--fast]

1. writes the bundled sample set (scikit-image's photos; keypoints and person masks from mediapipe when the
   annotators extra is installed, the hand-placed ones otherwise);
2. trains the tiny SwinIR (stage 0, the `swinir` phase) on it for about a minute and measures its PSNR gain over
   the degraded inputs (Real-ESRGAN degradations, seeded);
3. writes a weights folder of tiny stand-in models (random weights) with the trained SwinIR in it;
4. restores the degraded photos with DiffBody v1 and v2 end to end (the papers' presets: DDPM 50 steps, and 200
   in each v2 stage) through `diffbody restore`'s code path;
5. writes OUT/sheet.png (clean | degraded | SwinIR | v1 | v2 per photo), OUT/timing.md, and every output.

Only SwinIR is trained: the diffusion models are random, so v1 and v2 print noise-like images. What the demo
shows is the machinery (loading, batching, compiling, sampling, writing) and its cost; real restorations need
the real weights (the commands are printed at the end). --fast: 10 training steps and 2 sampling steps (the test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from diffbody_jax.annotators import default_annotator
from diffbody_jax.config import load_config
from diffbody_jax.data.degradations import degradation_from_config
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.pose import as_persons, transform_keypoints
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.evaluation.metrics import image_metrics
from diffbody_jax.interop.pretrained import load_pretrained
from diffbody_jax.pipelines.fit import fit_to_bucket
from diffbody_jax.pipelines.image_io import read_photo, write_png
from diffbody_jax.pipelines.jobs import PoseSource, prepare_jobs, run_jobs, write_outputs
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.stand_in import write_stand_in_weights
from diffbody_jax.training.engine import train

DEMO_SIZE = 64  # the tiny preset: every photo in one 64x64 bucket (one compile per version)
DEMO_MARK = ".diffbody-demo"  # marks a folder the demo may replace
DEGRADATION = "degradation:kind=real-esrgan"  # what the tiny SwinIR trains on
NEXT_STEPS = """With real weights (downloaded once, elsewhere), the same two steps:
  diffbody convert to-flax --src stable-diffusion-2-1-base --dst weights/sd21
  diffbody convert to-flax --src stable-diffusion-xl-base-1.0 --dst weights/sdxl
  diffbody convert swinir-to-flax --src general_swinir_v1.ckpt --config swinir:variant=diffbir --dst weights/swinir
  diffbody convert bodypart-to-flax --src bpbreid_market1501_hrnet32_10642.pth --dst weights/bodypart
  (the DiffBody ControlNets, joint UNet and colour adapter come from `diffbody train` runs' export/ folders)
  diffbody weights check weights
  diffbody restore photos/ --out restored/ --weights weights --version v1"""


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def __call__(self, what: str, seconds: float, note: str = "") -> None:
        self.rows.append((what, seconds, note))
        print(f"  {what}: {seconds:.1f} s{'  (' + note + ')' if note else ''}", flush=True)

    def markdown(self) -> str:
        lines = ["| stage | seconds | note |", "|---|---|---|"]
        lines += [f"| {w} | {s:.1f} | {n} |" for w, s, n in self.rows]
        lines.append(f"| total | {sum(s for _, s, _ in self.rows):.1f} | |")
        return "\n".join(lines) + "\n"


def train_swinir(data_dir: Path, workdir: Path, steps: int) -> Path:
    config = load_config("swinir:variant=tiny-diffbir", overrides=[
        f"data.manifest={data_dir / 'manifest.jsonl'}", f"train.steps={steps}", f"checkpoint.every={steps}"])
    return train(config, workdir).export


def demo_inputs(records, buckets, seed: int = 0) -> list[dict]:
    """Per sample-set record: name, clean (the photo inside its bucket with a reflected border), degraded (seeded
    Real-ESRGAN degradation of it), keypoints moved into the clean image, caption."""
    degrade = degradation_from_config(load_config(DEGRADATION))
    out = []
    for n, record in enumerate(records):
        photo = read_photo(record.image).pixels
        fitted = fit_to_bucket(photo, buckets)
        top, left, h, w = fitted.inner
        kp = transform_keypoints(as_persons(record.keypoints, record.keypoint_format),
                                 (h / photo.shape[0], w / photo.shape[1]), (-top, -left))
        degraded = degrade(fitted.pixels, np.random.default_rng([seed, n])).upsampled.astype(np.float32)
        out.append({"name": Path(record.image).stem, "clean": fitted.pixels, "degraded": degraded, "keypoints": kp,
                    "format": record.keypoint_format, "caption": record.caption})
    return out


def write_demo_inputs(out: Path, inputs: list[dict]) -> None:
    """OUT/clean/*.png, OUT/degraded/*.png and OUT/keypoints.jsonl (a manifest of the degraded photos' keypoints,
    what `diffbody restore --keypoints` reads)."""
    lines = []
    for x in inputs:
        write_png(out / "clean" / f"{x['name']}.png", x["clean"], overwrite=True)
        write_png(out / "degraded" / f"{x['name']}.png", x["degraded"], overwrite=True)
        keypoints = np.round(x["keypoints"].astype(np.float64), 2).tolist()
        lines.append(json.dumps({"image": f"degraded/{x['name']}.png", "caption": x["caption"],
                                 "keypoints": keypoints, "keypoint_format": x["format"]}))
    (out / "keypoints.jsonl").write_text("\n".join(lines) + "\n")


def swinir_gain(swinir_dir: Path, inputs: list[dict]) -> tuple[float, float]:
    """Mean PSNR (Y) of the degraded inputs and of SwinIR's outputs against the clean photos."""
    module, params = load_pretrained(swinir_dir)
    run = jax.jit(lambda p, x: module.apply({"params": p}, x))
    before, after = [], []
    for x in inputs:
        clean, degraded = x["clean"][None], x["degraded"][None]
        restored = np.clip(np.asarray(run(params, degraded)), 0, 1)
        before.append(float(image_metrics(degraded, clean)["psnr"][0]))
        after.append(float(image_metrics(restored, clean)["psnr"][0]))
    return float(np.mean(before)), float(np.mean(after))


def _grid(rows: list[list[np.ndarray]], scale: int = 3) -> np.ndarray:
    """Rows of images (padded to a common cell) -> one image, each cell scaled up `scale` x (nearest)."""
    cell_h = max(i.shape[0] for r in rows for i in r)
    cell_w = max(i.shape[1] for r in rows for i in r)
    out = np.ones((len(rows) * (cell_h + 2), max(len(r) for r in rows) * (cell_w + 2), 3), np.float32)
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
            top, left = y * (cell_h + 2), x * (cell_w + 2)
            out[top: top + image.shape[0], left: left + image.shape[1]] = image
    return np.repeat(np.repeat(out, scale, 0), scale, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffbody demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo")
    p.add_argument("--train-steps", type=int, default=400, help="SwinIR training steps (about a minute on 2 cores)")
    p.add_argument("--fast", action="store_true", help="10 training steps and 2 sampling steps (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARK).exists():
            print(f"diffbody demo: {out} exists and is not a demo folder; choose another --out", file=sys.stderr)
            return 1
        shutil.rmtree(out)  # a previous demo's output: replaced as a whole
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by diffbody demo; a new demo run replaces this folder\n")
    train_steps, sample_steps = (10, 2) if args.fast else (args.train_steps, None)
    timer = Timer()
    print(f"DiffBody demo -> {out}", flush=True)

    t = time.perf_counter()
    annotator = default_annotator()
    manifest = write_sample_set(out / "data", annotator=annotator)
    records = read_manifest(manifest)
    timer("sample set", time.perf_counter() - t, f"{len(records)} photos, keypoints "
          + ("from mediapipe" if annotator is not None else "hand-written (no annotator installed)"))

    t = time.perf_counter()
    export = train_swinir(out / "data", out / "runs" / "swinir", train_steps)
    timer("train SwinIR (stage 0)", time.perf_counter() - t, f"{train_steps} steps, tiny-diffbir, 64x64 crops")

    settings = {v: RestoreSettings(version=v, steps=sample_steps, size=DEMO_SIZE, square_only=True)
                for v in ("v1", "v2")}
    inputs = demo_inputs(records, settings["v1"].buckets, args.seed)
    write_demo_inputs(out, inputs)
    names = [x["name"] for x in inputs]
    t = time.perf_counter()
    before, after = swinir_gain(export, inputs)
    timer("SwinIR on seeded degradations", time.perf_counter() - t,
          f"PSNR {before:.2f} -> {after:.2f} dB ({after - before:+.2f} dB)")

    t = time.perf_counter()
    weights = write_stand_in_weights(out / "weights", seed=args.seed, skip=("swinir",))
    shutil.copytree(export, weights / "swinir")
    timer("weights folder", time.perf_counter() - t, "tiny stand-ins, random except SwinIR")

    results = {}
    for version, s in settings.items():
        files = [out / "degraded" / f"{n}.png" for n in names]
        jobs, problems = prepare_jobs(files, out / version, s, [x["caption"] for x in inputs],
                                      PoseSource(out / "keypoints.jsonl"), True)
        (out / version).mkdir(exist_ok=True)
        t = time.perf_counter()
        restorer = Restorer(weights, s)
        load = time.perf_counter() - t
        t = time.perf_counter()
        for job, outputs in run_jobs(restorer, jobs, batch=len(jobs), seed=args.seed):
            write_outputs(job, outputs, out / version, True, True)
            results.setdefault(job.out.stem, {})[version] = outputs
        steps = s.num_steps if version == "v1" else f"2 x {s.num_steps}"
        timer(f"restore {version}", load + time.perf_counter() - t,
              f"{len(jobs)} photos, DDPM {steps} steps, compile included (one per bucket)")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1

    rows = []
    for x in inputs:
        r = results[x["name"]]
        rows.append([x["clean"], x["degraded"], r["v1"]["i_reg"], r["v1"]["restored"], r["v2"]["restored"]])
    write_png(out / "sheet.png", _grid(rows), overwrite=True)
    (out / "timing.md").write_text(timer.markdown())
    (out / "summary.json").write_text(json.dumps({
        "swinir_psnr_degraded": before, "swinir_psnr_restored": after, "train_steps": train_steps,
        "sampling_steps": {v: s.num_steps for v, s in settings.items()},
        "timing_s": {w: s for w, s, _ in timer.rows}}, indent=2))
    print(f"""
wrote {out / 'sheet.png'} (per photo: clean | degraded | SwinIR | v1 | v2), {out / 'timing.md'}, and the outputs in
{out / 'v1'}, {out / 'v2'} (compare/ side by side, intermediates/).

Trained here: SwinIR only ({train_steps} steps): PSNR {before:.2f} -> {after:.2f} dB over the degraded inputs.
Random (tiny stand-ins): the body-part network, SD2.1 and SDXL UNets, VAEs and text encoders, both ControlNets
of v1 and v2, the joint UNet and the colour adapter. v1 and v2 outputs are therefore noise-like: the demo shows
the pipelines run end to end, not restorations.

{NEXT_STEPS}""")
    return 0
