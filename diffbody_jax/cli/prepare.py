"""`diffbody prepare`: encode a phase's frozen inputs (latents, text embeddings) once into a cache folder that
training reads with `--config.data.cache=DIR` instead of running those encoders every step.

  diffbody prepare --config configs/stage2_controlnet.py:variant=tiny --out cache/stage2 \
      --config.data.manifest=data/sample/manifest.jsonl --config.data.random_crop=False

The same config (and init sources) as the training run it is for; fixed crops (data.random_crop=False) and fixed
captions (text.drop_prob=0). Multi-host: one process per host, as for `diffbody train`.
"""

from __future__ import annotations

import logging
import sys

from diffbody_jax.cli.train import run_parser, split_overrides
from diffbody_jax.config import load_config
from diffbody_jax.parallel.mesh import initialize_distributed
from diffbody_jax.training.prepare import prepare_cache


def main(argv=None) -> int:
    overrides, rest = split_overrides(argv)
    parser = run_parser("diffbody prepare", __doc__)
    parser.add_argument("--out", required=True, help="the cache folder (shard-*.npz, cache.json)")
    args = parser.parse_args(rest)

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out = prepare_cache(load_config(args.config, overrides), args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffbody prepare: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}; train with --config.data.cache={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
