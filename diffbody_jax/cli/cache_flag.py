"""The `--compilation-cache` flag of the commands that compile models (restore, eval, demo, train)."""

from __future__ import annotations

import argparse

from diffbody_jax.compilation_cache import ENV, OFF, CompilationCache, default_cache_dir, use_compilation_cache


def add_compilation_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compilation-cache", metavar="DIR|off",
                   help=f"where compiled XLA programs are kept for the next run (default: ${ENV}, else "
                        f"{default_cache_dir()}); {OFF} turns it off")


def start_compilation_cache(args: argparse.Namespace) -> CompilationCache:
    """Call before the command compiles anything; raises ValueError naming a folder that cannot be made."""
    return use_compilation_cache(args.compilation_cache)
