"""The devices a plan bench compiles for: N forced host devices (CPU), or the chips of a TPU slice, compiled for
ahead of time on this machine (bench/README.md, "Plans"). Imported before jax: it sets XLA_FLAGS first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_target_args(p) -> None:
    p.add_argument("--devices", type=int,
                   help="devices to compile for: forced host devices (XLA_FLAGS; default 1), or the first N chips of "
                        "--target's slice (default all)")
    p.add_argument("--target", default="local",
                   help="local, or tpu:<topology> (tpu:v5e:2x4, tpu:v5e:8x8): XLA:TPU compiles for that slice")
    p.add_argument("--libtpu", help="a folder holding the libtpu package (pip install --target DIR libtpu==...)")


def target_devices_from(args) -> list:
    """Set up jax for `args` (before its first import) and return the devices to compile for."""
    if args.target == "local" and (args.devices or 1) > 1:
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={args.devices}").strip()
    if args.libtpu:
        sys.path.insert(0, str(Path(args.libtpu).absolute()))
        # no TPU here: jax runs on the CPU, and libtpu only describes and compiles for the slice
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several plans at once: no device is opened
    sys.path.insert(0, str(REPO))
    import jax

    from diffbody_jax.parallel.mesh import target_devices

    if args.target == "local":
        return jax.devices()[: args.devices or 1]
    return target_devices(args.target)[: args.devices]
