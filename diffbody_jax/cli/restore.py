"""`diffbody restore`: restore photos of people from a weights folder; `diffbody weights check`: what a weights folder
holds and what each version still needs.

  diffbody restore photos/ --out restored/ --weights weights/ [--version v1|v2] [--prompt TEXT | --prompts FILE]
      [--keypoints MANIFEST.jsonl | --poses DIR] [--annotator auto|none|mediapipe|onnx-dwpose:det=..,pose=..]
      [--steps N] [--sampler ddpm|ddim|dpmpp] [--cfg S] [--guidance S]
      [--seed K] [--batch B] [--size 512] [--fit bucket] [--colour none|adain|wavelet] [--dtype float32|bfloat16]
      [--attention bounded|einsum|chunked|cudnn|...] [--params auto|replicated|fsdp] [--offload] [--scan-layers]
      [--compilation-cache DIR|off] [--save-intermediates] [--overwrite]
  diffbody restore --plan HxW [--version v2] [--dtype bfloat16] [--batch B] [--params fsdp] [--offload] [--guidance S]
      [--scan-layers]
  diffbody weights check weights/

Writes OUT/<input name>.png (8-bit, EXIF orientation applied, ICC profile and alpha kept) and
OUT/compare/<name>.png (input | restoration side by side); with --save-intermediates OUT/intermediates/<name>_<what>.png
(v1: i_reg, attention; v2: i_ir, i_res, depth, normal; both: pose, the map the model was given). A bad input
(unreadable, truncated, not an image, too small, an existing output without --overwrite) gets one line naming the file
and the problem; the others are restored; the exit code is 1 if any input failed. The pose map comes from
--keypoints (a manifest whose `image` names match the inputs) or --poses (pose images named like the inputs); for the
other photos, from --annotator run on the regressed image (I_reg / I_ir, as the papers do; "auto": mediapipe when the
annotators extra is installed), or black with --annotator none. v1 weights without the body-part network take I_attn
from the annotator's person mask.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from diffbody_jax.annotators import AnnotatorError, annotator_from_spec, parse_spec, resolve_backend
from diffbody_jax.annotators.caption import Captioner
from diffbody_jax.cli.cache_flag import add_compilation_cache_arg, start_compilation_cache
from diffbody_jax.diffusion.contract import BASE_PIPELINE
from diffbody_jax.models.attention import backend_names
from diffbody_jax.parallel.sharding import PLACEMENTS
from diffbody_jax.pipelines.image_io import find_images
from diffbody_jax.pipelines.jobs import PoseSource, prepare_jobs, run_jobs, write_outputs
from diffbody_jax.pipelines.plan import plan_restore
from diffbody_jax.pipelines.prompts import prompts_for
from diffbody_jax.pipelines.restore import FITS, PRESET_STEPS, SAMPLERS, Restorer, RestoreSettings, restore_defaults
from diffbody_jax.pipelines.tiles import tiles_for
from diffbody_jax.pipelines.weights import (
    COMPONENTS,
    DTYPES,
    OPTIONAL,
    TRAINED_COMPONENTS,
    WeightsError,
    check_weights,
    component_contract,
    restore_contracts,
)


def add_restore_args(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    p.add_argument("--weights", required=weights_required,
                   help="weights folder (diffbody weights check DIR describes it)")
    p.add_argument("--version", choices=("v1", "v2"), default="v1")
    p.add_argument("--prompt", help="one prompt for every image (default: a generic photo-of-a-person prompt)")
    p.add_argument("--prompts", help="per-image prompts: a JSON object or `name<TAB>prompt` lines")
    p.add_argument("--negative-prompt", default=RestoreSettings.negative_prompt)
    p.add_argument("--steps", type=int, help=f"sampling steps (default: the papers' {PRESET_STEPS})")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="v1 part-loss guidance scale s of Algorithm 1 (0: off; the paper gives no value: tune it)")
    add_compilation_cache_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images per jitted call (split over the local devices)")
    p.add_argument("--size", type=int, default=512,
                   help="side of the square bucket, or of a tile with --fit tile (multiple of 64). v1 trains on "
                        "1024x512 crops only: its other buckets are outside what it trained on")
    p.add_argument("--fit", choices=FITS, default="bucket",
                   help="bucket: scale into the nearest bucket and back; tile: the photo's own size, on tiles "
                        "(the ControlNets then see per-tile encodings of I_reg and the pose, which training never "
                        "showed them)")
    p.add_argument("--colour", choices=("none", "adain", "wavelet"), default="none")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and compute of every model but the VAEs (float32 always; docs/scaling.md)")
    p.add_argument("--attention", choices=backend_names(), default=RestoreSettings.attention,
                   help="attention backend (bounded: memory-bounded, per platform: the einsum on CPU, cuDNN flash on "
                        "GPU, chunked or a registered splash kernel on TPU)")
    p.add_argument("--params", choices=PLACEMENTS, default=RestoreSettings.params,
                   help="weights on the local devices: replicated, or split by the training engine's FSDP rule "
                        "(auto: split when a copy would take over half of a device's memory)")
    p.add_argument("--offload", action="store_true",
                   help="v2: weights in host memory, each stage's on the devices only for its own program")
    p.add_argument("--scan-layers", action="store_true",
                   help="run each deep transformer stack of the UNets and ControlNets as one scan: SDXL's stage 2 "
                        "compiles in less time (docs/scaling.md)")
    p.add_argument("--keypoints", help="a manifest (JSONL) with keypoints for the inputs, matched by file name")
    p.add_argument("--poses", help="a folder of pose maps named like the inputs")
    p.add_argument("--recaption", metavar="DIR",
                   help="v2: condition stage 2 on a caption of I_res by this local transformers image-to-text folder "
                        "(BLIP; the paper's p' = LLaVA(I_res)); stage 1 and stage 2 then run as two programs")
    p.add_argument("--annotator", default="auto",
                   help="pose for photos without keypoints: auto | none | mediapipe | onnx-dwpose:det=FILE,pose=FILE")


def annotator_from(spec: str):
    """(annotator or None, note or None) for --annotator; "auto" without an installed annotator is None + a note."""

    if resolve_backend(parse_spec(spec)[0]) is None:
        return None, (None if spec == "none" else "no annotator installed (the annotators extra): photos without "
                      "--keypoints / --poses get black pose maps")
    return annotator_from_spec(spec), None


def settings_from(args) -> RestoreSettings:
    return RestoreSettings(version=args.version, steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                           guidance=args.guidance, colour=args.colour, size=args.size,
                           negative_prompt=args.negative_prompt, fit=args.fit, dtype=args.dtype,
                           attention=args.attention, params=args.params, offload=args.offload,
                           scan_layers=args.scan_layers)


class ProgressBars:
    """tqdm bars over images and, with `steps_enabled`, over the sampling steps of the running batch (hooked into
    the scan by a host callback, which keeps the program out of the compilation cache)."""
    def __init__(self, total_images: int, steps: int, enabled: bool = True, steps_enabled: bool = False):
        self.images = tqdm(total=total_images, desc="images", unit="img", disable=not enabled, position=0)
        self.steps = tqdm(total=steps, desc="steps", unit="step", disable=not (enabled and steps_enabled),
                          position=1, leave=False)
        self.hook = self.on_step if enabled and steps_enabled else None

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


def restore_main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files and folders of images")
    p.add_argument("--out")
    add_restore_args(p, weights_required=False)
    p.add_argument("--plan", metavar="HxW",
                   help="restore nothing: compile the version's program for HxW images and the papers' model sizes "
                        "(configs/, shapes only: no weights read) with these --dtype, --batch, --steps, --attention, "
                        "--params and --offload on the local devices, and print each device's memory")
    p.add_argument("--plan-variant", default="paper", help="the configs' variant --plan builds (paper, tiny)")
    p.add_argument("--save-intermediates", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--step-progress", action="store_true",
                   help="a progress bar over each batch's sampling steps too (a host callback in the scan: JAX does "
                        "not cache a program with one, so the sampler compiles on every run)")
    args = p.parse_args(argv)

    def fail(message: str) -> int:
        print(f"diffbody restore: {message}", file=sys.stderr)
        return 1

    if args.batch < 1:
        return fail(f"--batch {args.batch}: must be at least 1")
    if args.plan:
        return plan_main(args, fail)
    missing = [flag for flag, value in (("inputs", args.inputs), ("--out", args.out), ("--weights", args.weights))
               if not value]
    if missing:  # a usage error (exit 2), as argparse's own
        p.error(f"{', '.join(missing)} required (or --plan HxW)")
    try:
        cache = start_compilation_cache(args)
        settings = settings_from(args)
        style, default_prompt = restore_defaults(args.weights, settings.version)  # from the runs' contracts
        files, problems = find_images(args.inputs)
        prompts, notes = prompts_for(files, args.prompt, args.prompts, default=default_prompt)
        poses = PoseSource(args.keypoints, args.poses, style=style)
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
    bars = ProgressBars(len(jobs), settings.num_steps, enabled=not args.quiet, steps_enabled=args.step_progress)
    try:
        captioner = None
        if args.recaption:
            captioner = Captioner(args.recaption)
        restorer = Restorer(args.weights, settings, on_step=bars.hook, annotator=annotator, captioner=captioner)
    except (WeightsError, ValueError, AnnotatorError) as e:
        bars.close()
        return fail(str(e))
    for line in restorer.notes:
        print(f"note: {line}", file=sys.stderr)
    warning = restorer.annotator_warning(args.annotator if annotator is not None else None)
    if warning and poses.used < len(jobs):
        print(warning, file=sys.stderr)
    start, written = time.perf_counter(), 0
    try:
        for job, outputs in run_jobs(restorer, jobs, args.batch, args.seed, bars.batch_done):
            write_outputs(job, outputs, out, args.overwrite, args.save_intermediates)
            written += 1
    finally:
        bars.close()
    seconds = time.perf_counter() - start
    print(f"restored {written} image(s) into {out} in {seconds:.1f} s ({settings.version}, {settings.sampler} "
          f"{settings.num_steps} steps, {restorer.num_devices} device(s)); {len(problems)} failed")
    if not args.quiet:
        print(cache.summary() + (" (--step-progress keeps the sampling program out of it)"
                                 if args.step_progress and cache.folder else ""))
    return 1 if problems else 0


def plan_main(args, fail) -> int:
    """`diffbody restore --plan HxW`: the per-device memory of the restoration program (`pipelines.plan`)."""
    try:
        height, width = (int(x) for x in args.plan.lower().split("x"))
        if height % 64 or width % 64 or height < 64 or width < 64:
            raise ValueError
    except ValueError:
        return fail(f"--plan {args.plan!r}: expected HxW, multiples of 64 (e.g. 1024x512)")
    start_compilation_cache(args)
    try:
        plan = plan_restore(args.version, height, width, dtype=args.dtype, batch=args.batch, steps=args.steps,
                            params=args.params, variant=args.plan_variant, attention=args.attention,
                            offload=args.offload, tiles=tiles_for(args.fit, args.size), guidance=args.guidance,
                            scan_layers=args.scan_layers)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    print(plan.describe())
    return 0


def weights_main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="list the components of a weights folder and what each version needs")
    check.add_argument("folder")
    check.add_argument("--configs-only", action="store_true", help="read configs, not tensors (fast)")
    args = p.parse_args(argv)

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
        if r.present and r.name in TRAINED_COMPONENTS:
            try:
                contract = component_contract(args.folder, r.name)
                if contract is not None or r.name in BASE_PIPELINE:
                    print(f"{'':<22} contract: " + (contract.describe() if contract else
                          "none (converted weights: restored with the base pipeline's scheduler and defaults)"))
            except WeightsError as e:
                print(f"{'':<22} contract: BROKEN: {e}")
                r.problem = r.problem or str(e)
    ok = {r.name for r in reports if r.present and not r.problem}
    refused = False
    for version, missing in needs.items():
        absent = [n for n in OPTIONAL[version] if n not in ok]
        state = "ready" if not missing else "needs " + ", ".join(f"{n} ({COMPONENTS[n].source})" for n in missing)
        if not missing:
            try:
                restore_contracts(args.folder, version)
            except WeightsError as e:
                state, refused = f"REFUSED: {e}", True
        print(f"{version}: {state}" + "".join(
            f"; without {n}: I_attn from the annotator's person mask, no part-loss guidance"
            for n in absent if n == "bodypart"))
    return 1 if refused or any(r.problem for r in reports) else 0
