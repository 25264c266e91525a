"""Per-device memory of the papers' restoration programs, compiled for abstract weights (`pipelines.plan`).

    python bench/restore_plan.py                                    # v1 512x512 and v2 1024x512, float32 and bf16
    python bench/restore_plan.py --versions v2 --sizes 1024x512 --dtypes bfloat16 --devices 8 --params fsdp

No weights are read or allocated: the models are built from configs/ (variant=paper) as shapes, and XLA's
`memory_analysis()` of the compiled program gives each device's arguments, outputs and temporaries. --devices N
forces N host devices (XLA_FLAGS, set before jax is imported). On CPU the figures stand in for an accelerator's:
XLA:CPU computes bfloat16 matmuls in float32, so its bfloat16 temporaries hold float32 copies (docs/scaling.md).

--target tpu:v5e:2x4 compiles for the chips of a TPU slice instead, ahead of time on this machine (XLA:TPU's own
program and memory figures, no TPU needed); it needs the libtpu package that matches jax, kept out of the
project's environment (jax would try to start a TPU on every import):
    pip install --target .cache/libtpu "libtpu==0.0.42.*"     # jax 0.10.2's (its `tpu` extra names the version)
    python bench/restore_plan.py --libtpu .cache/libtpu --target tpu:v5e:2x4 --params fsdp
"""

from __future__ import annotations

import argparse
import resource

from targets import add_target_args, target_devices_from


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--versions", default="v1,v2")
    p.add_argument("--sizes", default="512x512,1024x512", help="HxW,...")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--params", default="replicated", help="replicated and/or fsdp, comma-separated")
    p.add_argument("--steps", type=int, help="sampling steps per stage (default the papers' 50 / 200)")
    p.add_argument("--offload", action="store_true", help="v2: each stage's weights on the devices for its program")
    p.add_argument("--tile", type=int, help="restore on tiles of this side (overlap a quarter), as --fit tile does")
    add_target_args(p)
    args = p.parse_args()
    devices = target_devices_from(args)
    import jax

    from diffbody_jax.pipelines.plan import plan_restore
    from diffbody_jax.pipelines.tiles import tiles_for

    print(f"# jax {jax.__version__}, compiled for {len(devices)} {devices[0].device_kind} device(s); GiB per device")
    print("| version | size | dtype | batch | devices, weights | all weights | arguments | temporaries | total | "
          "compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    for version in args.versions.split(","):
        for size in args.sizes.split(","):
            h, w = (int(x) for x in size.split("x"))
            for dtype in args.dtypes.split(","):
                for params in args.params.split(","):
                    plan = plan_restore(version, h, w, dtype=dtype, batch=len(devices), steps=args.steps,
                                        params=params, devices=devices, offload=args.offload,
                                        tiles=tiles_for("tile" if args.tile else "bucket", args.tile))
                    print(plan.row(), flush=True)
    print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    main()
