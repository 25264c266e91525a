"""`diffbody train` (also `python -m train`): run or resume one training phase.

  diffbody data sample-set --out data/sample
  diffbody train --config configs/swinir.py:variant=tiny-diffbir --workdir runs/swinir \
      --config.data.manifest=data/sample/manifest.jsonl --config.train.steps=20

Any config field is set by `--config.section.field=value`. Running again in the same workdir resumes from its
latest checkpoint; a larger `--config.train.steps` continues the run. Multi-host: start one process per host
with the same command; TPU pods, SLURM and Open MPI are found automatically, otherwise add
`--coordinator HOST:PORT --num_processes N --process_id I`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from diffbody_jax.cli.cache_flag import add_compilation_cache_arg, start_compilation_cache
from diffbody_jax.config import load_config
from diffbody_jax.parallel.mesh import initialize_distributed
from diffbody_jax.training.engine import NonFiniteLoss, train


def run_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every command that runs a phase's config takes (`train`, `prepare`): --config (with
    --config.x=y overrides, split off by `split_overrides`) and the multi-host flags."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Overrides: --config.section.field=value (any number).")
    parser.add_argument("--config", required=True, help="configs/<file>.py[:args], or a bare config name")
    parser.add_argument("--coordinator", help="multi-host: the address HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, help="multi-host: the number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    return parser


def split_overrides(argv) -> tuple[list[str], list[str]]:
    """(the --config.x=y overrides, the other arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [a for a in argv if a.startswith("--config.")], [a for a in argv if not a.startswith("--config.")]


def build_parser() -> argparse.ArgumentParser:
    parser = run_parser("diffbody train", __doc__)
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/, export/")
    add_compilation_cache_arg(parser)
    return parser


def main(argv=None) -> int:
    overrides, rest = split_overrides(argv)
    args = build_parser().parse_args(rest)

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # before any device is used

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cache = start_compilation_cache(args)
        config = load_config(args.config, overrides)
        result = train(config, args.workdir)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"diffbody train: {e}", file=sys.stderr)
        return 1
    print(f"trained to step {result.step} in {result.workdir}"
          + (f"; exported to {result.export}" if result.export else ""))
    print(cache.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
