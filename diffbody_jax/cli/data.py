"""Data set tools.

  python -m diffbody_jax.cli.data sample-set --out data/sample
  python -m diffbody_jax.cli.data validate data/sample/manifest.jsonl [--require pose,depth]
  python -m diffbody_jax.cli.data preview data/sample/manifest.jsonl --out preview.png \\
      [--degradation configs/degradation.py:kind=blur2-noise40-down4] [--buckets 256]

`validate` prints every bad line and exits 1 if there is one. `preview` writes one row per example:
clean crop | degraded input | pose map, as the training pipeline makes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffbody_jax.annotators import default_annotator
from diffbody_jax.config import load_config
from diffbody_jax.data.degradations import degradation_from_config
from diffbody_jax.data.manifest import ManifestError, read_manifest
from diffbody_jax.data.pipeline import PAPER_BUCKETS, DataConfig, ShardInfo, make_dataset
from diffbody_jax.data.sample_set import write_sample_set


def _preview(manifest: Path, out: Path, degradation_spec: str, bucket_short_side: int, seed: int) -> None:
    records = read_manifest(manifest, require=("pose",))
    k = bucket_short_side / 512
    buckets = tuple((int(h * k), int(w * k)) for h, w in PAPER_BUCKETS)
    config = DataConfig(batch_size=1, buckets=buckets, maps=("pose",), num_epochs=1)
    dataset = make_dataset(records, config, degradation_from_config(load_config(degradation_spec)), seed, ShardInfo())
    rows = []
    for batch in dataset:
        row = np.concatenate([batch["target"][0], batch["degraded"][0], batch["pose"][0]], axis=1)
        rows.append(np.pad(row, ((0, 0), (0, 3 * max(w for _, w in buckets) - row.shape[1]), (0, 0))))
    Image.fromarray((np.concatenate(rows) * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out} ({len(rows)} examples)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbody_jax.cli.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample-set", help="write the bundled sample photos, captions and keypoints")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stand-in-priors", action="store_true",
                   help="also write stand-in depth and normal maps (from the photos' luminance; not annotations)")
    p.add_argument("--keypoints", choices=("auto", "hand"), default="auto",
                   help="auto: mediapipe's keypoints and person masks when installed; hand: the hand-written ones")
    p = sub.add_parser("validate", help="check every line of a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--require", default="", help="comma-separated maps every line needs: pose,depth,normal,attention")
    p.add_argument("--headers-only", action="store_true", help="read image headers only (skips full decodes)")
    p = sub.add_parser("preview", help="a PNG of the pipeline's clean / degraded / pose triplets")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--degradation", default="configs/degradation.py:kind=real-esrgan")
    p.add_argument("--buckets", type=int, default=256, help="short side of the buckets (the paper's is 512)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "sample-set":
            annotator = default_annotator() if args.keypoints == "auto" else None
            if args.keypoints == "auto" and annotator is None:
                print("note: no annotator installed (the annotators extra): hand-written keypoints", file=sys.stderr)
            print(f"wrote {write_sample_set(args.out, stand_in_priors=args.stand_in_priors, annotator=annotator)}")
        elif args.command == "validate":
            require = tuple(filter(None, args.require.split(",")))
            records = read_manifest(args.manifest, decode=not args.headers_only, require=require)
            print(f"{args.manifest}: {len(records)} examples, all valid")
        else:
            _preview(args.manifest, args.out, args.degradation, args.buckets, args.seed)
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
