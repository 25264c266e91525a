"""`diffbody zoo`: train the tiny DiffBody zoo from scratch (training/zoo.py) and assemble its weights folder.

  diffbody zoo --out zoo                        # zoo/data, zoo/runs/<phase>, zoo/weights, zoo/zoo.json
  diffbody zoo --out zoo --budget full          # the committed zoo's budget: hours on 2 cores
  diffbody zoo --out zoo --steps-scale 0.05     # a shortened zoo: every phase and hand-off, few steps
  diffbody zoo --out zoo --budget full --pack shipped   # then its trained weights at half precision, as committed

Rerunning the same command continues where it stopped, phase by phase; rerunning a quick zoo with --budget full
continues each phase's run. Then:
  diffbody restore photos/ --out restored/ --weights zoo/weights --version v1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffbody_jax.annotators import default_annotator
from diffbody_jax.training.zoo import BUDGETS, pack_zoo, train_zoo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffbody zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the zoo's folder (created; rerun to resume)")
    parser.add_argument("--budget", choices=BUDGETS, default="quick",
                        help="quick: within 45 minutes on 2 CPU cores; full: the committed zoo's steps")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack", type=Path, help="then write the zoo as the repository ships it (pack_zoo)")
    parser.add_argument("--keypoints", choices=("auto", "hand"), default="auto",
                        help="auto: mediapipe's keypoints and person masks when installed; hand: the hand-written ones")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        parser.error(f"--steps-scale must be positive, got {args.steps_scale}")

    annotator = default_annotator() if args.keypoints == "auto" else None
    try:
        result = train_zoo(args.out, budget=args.budget, steps_scale=args.steps_scale, seed=args.seed,
                           annotator=annotator)
    except ValueError as e:
        print(f"diffbody zoo: {e}", file=sys.stderr)
        return 1
    for name, phase in result.record["phases"].items():
        print(f"  {name:18s} {phase['steps']:6d} steps  {phase['wall_s']:7.1f} s  loss {phase['final'].get('loss')}")
    print(f"weights: {result.weights}  (record: {result.out / 'zoo.json'})")
    if args.pack:
        record = pack_zoo(result.out, args.pack)
        size = sum(f.stat().st_size for f in args.pack.rglob("*") if f.is_file())
        print(f"packed: {args.pack} ({size / 2**20:.1f} MiB, {len(record['shipped']['weights'])} components at "
              f"{record['shipped']['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
