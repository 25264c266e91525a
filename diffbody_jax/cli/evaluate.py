"""`diffbody eval`: restore seeded degradations of ground-truth photos and score them (Table 1 of DiffBody v2).

  diffbody eval GT_DIR --weights weights/ --out eval/ [--version v1|v2] [--mixtures all|NAME,...] [--seed 0]
      [--size 512] [--steps N] [--sampler ...] [--batch B] [--save-images]
      [--metrics psnr,ssim,cpsnr,cssim,lpips,lpips-vgg,maniqa,clipiqa,musiq] [--lpips-alex FILE]
      [--lpips-vgg FILE] [--lpips-lin DIR] [--clip-rn50 FILE] [--clipiqa-prompts paper|pyiqa]
      [--maniqa FILE] [--maniqa-scale 0.8] [--musiq FILE]
      [--depth-estimator ONNX] [--normal-estimator ONNX]

The run itself is `diffbody_jax.evaluation.table1.evaluate`: each ground-truth photo scaled into its bucket is the
reference, each of the five Table-1 mixtures degrades it (seeded from --seed), the version restores it, and PSNR /
SSIM (on BT.601 luma) and CPSNR / CSSIM (on RGB) are measured for the degraded input, SwinIR's output and the
restoration. --metrics chooses (`evaluation.quality`): a learned metric whose weights are not given (LPIPS: a
torchvision AlexNet / VGG16 state-dict file; CLIP-IQA: a ResNet-50 CLIP file; MANIQA, MUSIQ: pyiqa's files) is
named in one line and left out of the table. v2 with --depth-estimator / --normal-estimator (local ONNX files,
`annotators.dense`) also reports stage 1's prior errors, as the v2 paper's Tables 2-3. --keypoints are in the ground
truth's pixels. Writes OUT/metrics.json (per photo and mean per mixture) and OUT/metrics.md (the table in the v2
paper's Table-1 layout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffbody_jax.annotators import AnnotatorError
from diffbody_jax.annotators.dense import DepthEstimator, NormalEstimator
from diffbody_jax.cli.cache_flag import start_compilation_cache
from diffbody_jax.cli.restore import add_restore_args, annotator_from, settings_from
from diffbody_jax.data.degradations import TABLE1_MIXTURES
from diffbody_jax.evaluation.quality import DEFAULT_METRICS, METRICS, MetricSet, MetricWeights, parse_names
from diffbody_jax.evaluation.table1 import evaluate, markdown_table
from diffbody_jax.files import write_json
from diffbody_jax.pipelines.image_io import find_images, read_photos, write_png
from diffbody_jax.pipelines.jobs import PoseSource
from diffbody_jax.pipelines.prompts import prompts_for
from diffbody_jax.pipelines.restore import Restorer, restore_defaults
from diffbody_jax.pipelines.weights import WeightsError


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="diffbody eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt", nargs="+", help="ground-truth image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--mixtures", default="all", help="all, or Table-1 mixture names separated by commas")
    p.add_argument("--save-images", action="store_true",
                   help="also write each mixture's reference, degraded and restored PNGs")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated, of {', '.join(METRICS)}")
    p.add_argument("--lpips-alex", metavar="FILE", help="torchvision's AlexNet state dict (alexnet-owt-*.pth): LPIPS")
    p.add_argument("--lpips-vgg", metavar="FILE", help="torchvision's VGG16 state dict (vgg16-*.pth): LPIPS-VGG")
    p.add_argument("--lpips-lin", metavar="DIR",
                   help="a folder with LPIPS's alex.pth / vgg.pth linear layers (default: the lpips package's)")
    p.add_argument("--clip-rn50", metavar="FILE",
                   help="CLIP ResNet-50 weights for CLIP-IQA (OpenAI's RN50.pt or an open_clip RN50 state dict)")
    p.add_argument("--clipiqa-prompts", choices=("paper", "pyiqa"), default="paper",
                   help="CLIP-IQA's antonym prompts: the paper's pair, or the five pairs of pyiqa's clipiqa")
    p.add_argument("--maniqa", metavar="FILE", help="a pyiqa MANIQA file (ckpt_koniq10k.pt, MANIQA_PIPAL-*.pth)")
    p.add_argument("--maniqa-scale", type=float, default=0.8,
                   help="MANIQA's Swin residual scale, not stored in its file: 0.8 KonIQ / KADID, 0.13 PIPAL")
    p.add_argument("--musiq", metavar="FILE", help="a pyiqa MUSIQ file (musiq_koniq_ckpt-*.pth)")
    p.add_argument("--depth-estimator", metavar="ONNX", help="v2: depth model for stage 1's depth error")
    p.add_argument("--normal-estimator", metavar="ONNX", help="v2: normal model for stage 1's normal error")
    add_restore_args(p)
    args = p.parse_args(argv)

    def fail(message: str) -> int:
        print(f"diffbody eval: {message}", file=sys.stderr)
        return 1

    mixtures = list(TABLE1_MIXTURES) if args.mixtures == "all" else args.mixtures.split(",")
    unknown = [m for m in mixtures if m not in TABLE1_MIXTURES]
    if unknown:
        return fail(f"--mixtures: unknown {unknown}; known: {', '.join(TABLE1_MIXTURES)}")
    try:
        names = parse_names(args.metrics)
        cache = start_compilation_cache(args)
        settings = settings_from(args)
        files, problems = find_images(args.gt)
        photos, bad = read_photos(files)
        problems += bad
        style, default_prompt = restore_defaults(args.weights, settings.version)
        prompts, _ = prompts_for([ph.path for ph in photos], args.prompt, args.prompts, default=default_prompt)
        poses = PoseSource(args.keypoints, args.poses, style=style)
        annotator, _ = annotator_from(args.annotator)
        depth = DepthEstimator(args.depth_estimator) if args.depth_estimator else None
        normal = NormalEstimator(args.normal_estimator) if args.normal_estimator else None
    except (ValueError, FileNotFoundError, AnnotatorError) as e:
        return fail(str(e))
    if (depth or normal) and settings.version != "v2":
        print("note: --depth-estimator / --normal-estimator: prior errors are v2's (stage 1's maps); left out",
              file=sys.stderr)
    metrics = MetricSet(names, MetricWeights(lpips_alex=args.lpips_alex, lpips_vgg=args.lpips_vgg,
                                             lpips_lin=args.lpips_lin, clip_rn50=args.clip_rn50,
                                             clipiqa_prompts=args.clipiqa_prompts, maniqa=args.maniqa,
                                             maniqa_scale=args.maniqa_scale, musiq=args.musiq, depth_estimator=depth,
                                             normal_estimator=normal))
    for line in metrics.notes:
        print(f"note: {line}", file=sys.stderr)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    if not photos:
        return fail("no ground-truth image to evaluate on")
    try:
        restorer = Restorer(args.weights, settings, annotator=annotator)
    except (WeightsError, ValueError) as e:
        return fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save(mixture, job, images):
        if args.save_images:
            for name in ("reference", "degraded", "restored"):
                write_png(out / mixture / name / f"{job.photo.path.stem}.png", images[name], overwrite=True)

    def report(mixture, mean):
        if not args.quiet:
            print(f"{mixture}: " + ", ".join(f"{k} {v:.4g}" for k, v in mean["restored"].items()))

    result = evaluate(restorer, photos, prompts, poses, mixtures, args.seed, args.batch, save, report, metrics)
    means, per_photo = result["mean"], result["per_photo"]
    write_json({"version": settings.version, "steps": settings.num_steps, "sampler": settings.sampler,
                "seed": args.seed, "size": settings.size, "photos": [ph.path.name for ph in photos],
                "metrics": metrics.names, "left_out": metrics.notes,
                "mean": means, "per_photo": per_photo}, out / "metrics.json")
    (out / "metrics.md").write_text(markdown_table(means, settings.version, len(photos)))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'} ({len(photos)} photo(s) x {len(mixtures)} "
          f"mixture(s) in {time.perf_counter() - start:.1f} s); {len(problems)} skipped")
    if not args.quiet:
        print(cache.summary())
    return 1 if problems else 0
