"""`diffbody zoo`: train the tiny DiffBody zoo from scratch (training/zoo.py) and assemble its weights folder.

  diffbody zoo --out zoo                        # zoo/data, zoo/runs/<phase>, zoo/weights, zoo/zoo.json
  diffbody zoo --out zoo --steps-scale 0.05     # a shortened zoo: every phase and hand-off, few steps

Rerunning the same command continues where it stopped, phase by phase. Then:
  diffbody restore photos/ --out restored/ --weights zoo/weights --version v1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffbody zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the zoo's folder (created; rerun to resume)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every phase's steps (the full zoo: 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keypoints", choices=("auto", "hand"), default="auto",
                        help="auto: mediapipe's keypoints and person masks when installed; hand: the hand-written ones")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        parser.error(f"--steps-scale must be positive, got {args.steps_scale}")

    from diffbody_jax.annotators import default_annotator
    from diffbody_jax.training.zoo import train_zoo

    annotator = default_annotator() if args.keypoints == "auto" else None
    try:
        result = train_zoo(args.out, steps_scale=args.steps_scale, seed=args.seed, annotator=annotator)
    except ValueError as e:
        print(f"diffbody zoo: {e}", file=sys.stderr)
        return 1
    for name, phase in result.record["phases"].items():
        print(f"  {name:18s} {phase['steps']:6d} steps  {phase['wall_s']:7.1f} s  loss {phase['final'].get('loss')}")
    print(f"weights: {result.weights}  (record: {result.out / 'zoo.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
