"""`diffbody`: one command for the whole tool.

    diffbody convert to-flax --src stable-diffusion-2-1-base --dst ckpt/sd21-base
    diffbody data sample-set --out data/sample
    diffbody train --config configs/swinir.py:variant=tiny-diffbir --workdir runs/swinir --config.data.manifest=...
    diffbody prepare --config configs/stage2_controlnet.py --out cache/stage2 --config.data.manifest=...

Each subcommand is the program of the same name under diffbody_jax/cli/ (`python -m convert` and
`python -m train` are aliases kept for scripts); config files are found by name from any directory.
"""

from __future__ import annotations

import sys

from diffbody_jax.cli import convert, data, demo, evaluate, prepare, restore, train

COMMANDS = {"convert": convert.main, "data": data.main, "prepare": prepare.main, "train": train.main,
            "restore": restore.restore_main, "weights": restore.weights_main, "eval": evaluate.main,
            "demo": demo.main}
PENDING: dict[str, str] = {}


def _usage() -> str:
    names = ", ".join([*COMMANDS, *PENDING])
    return f"usage: diffbody {{{names}}} ... (diffbody <command> --help for each)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return COMMANDS[command](rest)
    if command in PENDING:
        print(f"diffbody {command}: not implemented yet in this version; it comes with {PENDING[command]} "
              "(see README.md, 'Status').", file=sys.stderr)
        return 2
    print(f"diffbody: unknown command {command!r}\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
