"""Memory of `--fit tile` on a large photo: the full-size v1 pipeline's compiled program, and a tiny-preset run.

  python bench/restore_memory.py                      # 2048 x 1536, tiles of 512 (128 overlap), DDPM 50 steps
  python bench/restore_memory.py --skip-run           # only the compiled program's memory (no weights needed)

1. The paper's v1 models (SD2.1-base UNet and its v1 ControlNet, the SD VAE, OpenCLIP-H text encoder, DiffBIR's
   SwinIR, BPBreID), abstract (`jax.eval_shape`: no weights, no memory), run through `V1Pipeline` with tiles as one
   jitted program for a batch of one 2048 x 1536 photo, lowered and compiled for this machine's backend;
   `memory_analysis()` gives the bytes of its arguments (the weights and inputs), outputs and temporaries. On an
   accelerator the same program's figure is what must fit in device memory; XLA:CPU fuses differently, so read it
   as an estimate.
2. The tiny preset restoring a 2048 x 1536 photo through `diffbody restore --fit tile` on this machine (steps as
   given, default 2), with the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import load_report  # noqa: E402

from diffbody_jax.pipelines.plan import plan_restore  # noqa: E402
from diffbody_jax.pipelines.tiles import tiles_for  # noqa: E402

GB = 1024**3


def full_size_program(height: int, width: int, tile: int, steps: int):
    """The paper's v1 restoring one photo on tiles, compiled for abstract weights (`pipelines.plan.plan_restore`)."""
    return plan_restore("v1", height, width, steps=steps, tiles=tiles_for("tile", tile))


def tiny_run(height: int, width: int, steps: int) -> dict:
    from PIL import Image

    from diffbody_jax.cli.main import main as diffbody
    from diffbody_jax.pipelines.stand_in import write_stand_in_weights

    folder = Path(tempfile.mkdtemp(prefix="bench-restore-memory-"))
    weights = write_stand_in_weights(folder / "weights", versions=("v1",))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.uniform(0, 1, (height, width, 3)) * 255).astype(np.uint8)).save(folder / "big.png")
    start = time.perf_counter()
    rc = diffbody(["restore", str(folder / "big.png"), "--out", str(folder / "out"), "--weights", str(weights),
                   "--fit", "tile", "--size", "128", "--steps", str(steps), "--sampler", "ddim", "--quiet"])
    seconds = time.perf_counter() - start
    size = Image.open(folder / "out" / "big.png").size if rc == 0 else None
    return {"rc": rc, "seconds": seconds, "output_size": size,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tiny-steps", type=int, default=2)
    p.add_argument("--skip-run", action="store_true")
    p.add_argument("--skip-program", action="store_true")
    args = p.parse_args()
    print(f"# jax {jax.__version__} ({jax.default_backend()}); photo {args.height} x {args.width}; expected run time "
          "~10 min (the tiny run ~8.5, the program ~1)")
    load_report("before")
    if not args.skip_run:
        r = tiny_run(args.height, args.width, args.tiny_steps)
        print(f"tiny preset, --fit tile --size 128, DDIM {args.tiny_steps} steps: rc {r['rc']}, {r['seconds']:.1f} s "
              f"(compile included), output {r['output_size']}, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    if not args.skip_program:
        m = full_size_program(args.height, args.width, args.tile, args.steps)
        print(f"full-size v1 (SD2.1-base), tiles {args.tile}/{args.tile // 4}, DDPM {args.steps}:")
        print(m.describe())
    load_report("after")


if __name__ == "__main__":
    main()
