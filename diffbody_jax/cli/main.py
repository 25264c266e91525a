"""`diffbody`: one command for the whole tool.

    diffbody convert to-flax --src stable-diffusion-2-1-base --dst ckpt/sd21-base
    diffbody data sample-set --out data/sample
    diffbody train --config configs/swinir.py:variant=tiny-diffbir --workdir runs/swinir --config.data.manifest=...
    diffbody prepare --config configs/stage2_controlnet.py --out cache/stage2 --config.data.manifest=...
    diffbody demo --out demo
    diffbody weights check weights/
    diffbody restore photos/ --out restored/ --weights weights/ --version v1
    diffbody eval ground_truth/ --out eval/ --weights weights/
    diffbody annotate photos/ --out annotations/
    diffbody zoo --out zoo
    diffbody serve                    # a local page: upload, restore, compare, download

Each subcommand is a program under diffbody_jax/cli/ (restore and weights in restore.py, eval in evaluate.py;
`python -m convert` and `python -m train` are aliases kept for scripts); config files are found by name from any
directory.
"""

from __future__ import annotations

import importlib
import sys

from diffbody_jax.host_memory import reexec_with_hugepages

# command -> (module under diffbody_jax.cli, function): a command's module (and jax with it) is imported only when
# that command runs, so `diffbody --help` and a usage error answer at once
COMMANDS = {"convert": ("convert", "main"), "data": ("data", "main"), "prepare": ("prepare", "main"),
            "train": ("train", "main"), "restore": ("restore", "restore_main"), "weights": ("restore", "weights_main"),
            "eval": ("evaluate", "main"), "demo": ("demo", "main"), "annotate": ("annotate", "main"),
            "zoo": ("zoo", "main"), "serve": ("serve", "main")}


def _usage() -> str:
    names = ", ".join(COMMANDS)
    return f"usage: diffbody {{{names}}} ... (diffbody <command> --help for each)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        module, function = COMMANDS[command]
        return getattr(importlib.import_module(f"diffbody_jax.cli.{module}"), function)(rest)
    print(f"diffbody: unknown command {command!r}\n{_usage()}", file=sys.stderr)
    return 2


def run() -> None:
    """The `diffbody` console script: first XLA:CPU's temporaries on huge pages (diffbody_jax/host_memory.py: the
    process executes itself again once, before jax is imported), then `main`."""
    reexec_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    run()
