"""`diffbody annotate`: pose keypoints, a pose map and a person mask for photos, offline, for inspection.

  diffbody annotate photos/ --out annotations/ [--backend auto|mediapipe|onnx-dwpose|keypoints-file] [--keypoints FILE]
  diffbody annotate --manifest data/train.jsonl --out data/train_annotated.jsonl [--replace]
                    [--depth DEPTH.onnx] [--normal NORMAL.onnx] [--captioner BLIP_FOLDER] [--backend none]

Writes, per photo, OUT/<name>.json (COCO-17 and OpenPose-18 keypoints in pixels, with confidences), OUT/<name>_pose.png
(drawn as DWPose draws it) and OUT/<name>_mask.png (the person mask, when the backend gives one). "auto" is mediapipe
when the `annotators` extra is installed. A photo without a person gets a warning and an empty pose map; a photo that
cannot be read gets one line; the exit code is 1 if any input failed.

With --manifest, every line of the training manifest gets `keypoints` (kept when present, unless --replace) and a
`mask` path (the person mask, written beside the output manifest under mask/); --depth / --normal add depth and
normal maps from local ONNX models (depth/, normal/), --captioner fills empty captions from a local transformers
folder (BLIP); --backend none leaves keypoints and masks alone. The output is validated.
onnx-dwpose needs --det and --pose (local YOLOX and DWPose/RTMPose ONNX files; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from diffbody_jax.annotators import AnnotatorError, get_annotator
from diffbody_jax.annotators.caption import Captioner
from diffbody_jax.annotators.dense import DepthEstimator, NormalEstimator
from diffbody_jax.annotators.manifest import fill_manifest
from diffbody_jax.data.manifest import ManifestError
from diffbody_jax.data.pose import PoseStyle
from diffbody_jax.pipelines.image_io import find_images, read_photos, write_png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffbody annotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files and folders of images")
    p.add_argument("--out", required=True, help="a folder (images) or the output manifest (--manifest)")
    p.add_argument("--manifest", help="fill this training manifest's keypoints and masks into --out")
    p.add_argument("--replace", action="store_true", help="--manifest: re-annotate lines that have keypoints")
    p.add_argument("--backend", default="auto", help="auto | mediapipe | onnx-dwpose | keypoints-file")
    p.add_argument("--pose-style", default="", help="how pose maps are drawn: threshold=0.3,hands=1,face=1 (the "
                   "training data's data.pose_style; a trained run's contract.json records it)")
    p.add_argument("--keypoints", help="the keypoints-file backend's manifest or JSON")
    p.add_argument("--det", help="onnx-dwpose: the person detector's ONNX file (YOLOX)")
    p.add_argument("--pose", help="onnx-dwpose: the whole-body pose model's ONNX file (DWPose / RTMPose)")
    p.add_argument("--depth", help="--manifest: a depth ONNX file (MiDaS / DPT: relative inverse depth)")
    p.add_argument("--normal", help="--manifest: a surface-normal ONNX file (Omnidata: output in [0, 1])")
    p.add_argument("--captioner", help="--manifest: a local transformers image-to-text folder (BLIP)")
    args = p.parse_args(argv)

    try:
        style = PoseStyle.parse(args.pose_style)
    except ValueError as e:
        print(f"diffbody annotate: --pose-style: {e}", file=sys.stderr)
        return 2
    if bool(args.inputs) == bool(args.manifest):
        p.error("give images or --manifest (one of the two)")
    if not args.manifest and (args.depth or args.normal or args.captioner or args.backend == "none"):
        p.error("--depth, --normal, --captioner and --backend none go with --manifest")

    options = {k: v for k, v in (("keypoints", args.keypoints), ("det", args.det), ("pose", args.pose)) if v}
    try:
        annotator = None if args.backend == "none" else get_annotator(args.backend, **options)
        if args.manifest:
            return _fill(annotator, args)
    except (AnnotatorError, TypeError) as e:
        print(f"diffbody annotate: {e}", file=sys.stderr)
        return 1
    return _annotate_images(annotator, args, style)


def _fill(annotator, args) -> int:
    estimators = dict(depth=DepthEstimator(args.depth) if args.depth else None,
                      normal=NormalEstimator(args.normal) if args.normal else None,
                      captioner=Captioner(args.captioner) if args.captioner else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fill_manifest(annotator, args.manifest, args.out, replace=args.replace, **estimators)
    except (ManifestError, FileNotFoundError) as e:
        print(f"diffbody annotate: {e}", file=sys.stderr)
        return 1
    for path in report.no_person:
        print(f"warning: {path}: no person found; no keypoints (an empty pose map)", file=sys.stderr)
    print(f"{args.out}: {report.lines} line(s), {report.annotated} annotated, {report.kept} kept their keypoints, "
          f"{len(report.no_person)} without a person; {report.maps} depth/normal map(s), {report.captions} caption(s)")
    return 0


def _annotate_images(annotator, args, style) -> int:
    files, problems = find_images(args.inputs)
    photos, bad = read_photos(files, min_size=1)
    problems += bad
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = 0
    for photo in photos:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annotation = annotator(photo.pixels, name=photo.path.name)
        if annotation.num_persons == 0:
            print(f"warning: {photo.path}: no person found; the pose map is empty", file=sys.stderr)
        found += annotation.num_persons > 0
        (out / f"{photo.path.stem}.json").write_text(json.dumps(annotation.to_json()))
        write_png(out / f"{photo.path.stem}_pose.png", annotation.pose_map(style),
                  overwrite=True)
        if annotation.mask is not None:
            write_png(out / f"{photo.path.stem}_mask.png", np.repeat(annotation.mask[..., None], 3, -1),
                      overwrite=True)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"annotated {len(photos)} photo(s) into {out} ({found} with a person); {len(problems)} failed")
    return 1 if problems else 0
