"""`diffbody prepare`: encode a phase's frozen inputs (latents, text embeddings) once into a cache folder that
training reads with `--config.data.cache=DIR` instead of running those encoders every step.

  diffbody prepare --config configs/stage2_controlnet.py:variant=tiny --out cache/stage2 \
      --config.data.manifest=data/sample/manifest.jsonl --config.data.random_crop=False

The same config (and init sources) as the training run it is for; fixed crops (data.random_crop=False) and fixed
captions (text.drop_prob=0). Multi-host: one process per host, as for `diffbody train`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="diffbody prepare", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: --config.section.field=value (any number).")
    parser.add_argument("--config", required=True, help="configs/<file>.py[:args], or a bare config name")
    parser.add_argument("--out", required=True, help="the cache folder (shard-*.npz, cache.json)")
    parser.add_argument("--coordinator", help="multi-host: the address HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, help="multi-host: the number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])

    from diffbody_jax.parallel.mesh import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from diffbody_jax.config import load_config
    from diffbody_jax.training.prepare import prepare_cache

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
