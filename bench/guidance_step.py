"""What part-loss guidance (v1's Algorithm 1) costs per sampling step, against the unguided step.

    python bench/guidance_step.py                          # memory (tiny 64 px, paper 1024x512), time (tiny, mid)
    python bench/guidance_step.py --memory-sizes 512x512 --time-presets tiny

A guided step differentiates the step's loss through the VAE decode, the body-part network, the UNet and the
ControlNet back to z_t (jax.grad inside the sampler's scan); the unguided step runs the UNet and ControlNet forward
only. The guided programs differ in which members rematerialise their blocks in that backward pass (`--remat`
sets: "none", "vae", "unet+controlnet+vae" = what `diffbody restore --guidance` builds).

Memory: `pipelines.plan.plan_restore` compiles v1's whole restoration (2 DDPM steps, every step guided) for abstract
weights and reads XLA's per-device temporaries (`memory_analysis`): the tiny variant at 64 x 64 px (the zoo's
size) and the paper's models at 1024 x 512 (seed 000's training size), float32.

Time: the tiny and mid presets of bench/restore.py (random stand-in weights, batch 1, 64 / 256 px), DDPM with every
step guided. The cost of one step is the slope between --steps-short and --steps-long steps (the fixed SwinIR,
encode and decode cancel). Each pipeline is timed as the median of --repeats calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, load_report, median_time  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402
from diffbody_jax.diffusion.samplers import SamplerConfig  # noqa: E402
from diffbody_jax.diffusion.schedule import NoiseSchedule  # noqa: E402
from diffbody_jax.files import read_json  # noqa: E402
from diffbody_jax.models.group import ModelGroup  # noqa: E402
from diffbody_jax.models.registry import build_model  # noqa: E402
from diffbody_jax.models.variables import random_variables  # noqa: E402
from diffbody_jax.pipelines.plan import plan_restore  # noqa: E402
from diffbody_jax.pipelines.v1 import V1Pipeline  # noqa: E402
from diffbody_jax.pipelines.weights import GUIDANCE_REMAT_MEMBERS  # noqa: E402

PRESETS = {"tiny": 64, "mid": 256}  # v1_controlnet variant -> image side in pixels (bench/restore.py's presets)
REMAT_SETS = {"none": (), "vae": ("vae",), "+".join(GUIDANCE_REMAT_MEMBERS): GUIDANCE_REMAT_MEMBERS}
SCHEDULE = REPO / "configs/diffusers/sd21-base/scheduler/scheduler_config.json"
MiB = 2**20


def memory_rows(sizes, remats, steps: int) -> None:
    print(f"\n## memory: v1's whole restoration, {steps} DDPM steps, float32, batch 1 (XLA temporaries per device)")
    print(f"{'variant':<8} {'size':<10} {'guidance':<9} {'remat':<22} {'temp MiB':>10} {'args MiB':>10} "
          f"{'compile s':>10}")
    for variant, (h, w) in sizes:
        settings = [(0.0, ())] + [(1.0, REMAT_SETS[r]) for r in remats]
        for guidance, remat in settings:
            plan = plan_restore("v1", h, w, variant=variant, steps=steps, guidance=guidance, remat=remat)
            print(f"{variant:<8} {f'{h}x{w}':<10} {'on' if guidance else 'off':<9} {'+'.join(remat) or 'none':<22} "
                  f"{plan.temporaries_gib * 1024:>10.1f} {plan.arguments_gib * 1024:>10.1f} "
                  f"{plan.compile_s:>10.1f}", flush=True)


def _group(variant: str, remat) -> ModelGroup:
    group = build_model(load_config(f"v1_controlnet:variant={variant}").model)
    return ModelGroup(**{name: m.clone(remat=True) if name in remat else m for name, m in group.members.items()})


def seconds_per_step(group, variables, inputs, guidance: float, short: int, long: int, repeats: int):
    """(seconds per DDPM step, compile seconds of both programs): the slope between `short` and `long` steps."""
    schedule = NoiseSchedule.from_dict(read_json(SCHEDULE), str(SCHEDULE))
    seconds, compile_s = [], 0.0
    for steps in (short, long):
        pipe = V1Pipeline(group, schedule, SamplerConfig(method="ddpm", num_steps=steps, guidance_scale=guidance))

        def run(pipe=pipe):
            jax.block_until_ready(pipe(variables, jax.random.key(0), *inputs)["restored"])

        start = time.perf_counter()
        run()
        compile_s += time.perf_counter() - start
        seconds.append(median_time(run, 0, repeats))
    return (seconds[1] - seconds[0]) / (long - short), compile_s


def time_rows(presets, remats, short: int, long: int, repeats: int) -> None:
    print(f"\n## time per DDPM step (slope between {short} and {long} steps), batch 1, every step guided")
    print(f"{'preset':<8} {'guidance':<9} {'remat':<22} {'ms/step':>10} {'x unguided':>11} {'compile s':>10}")
    rng = np.random.default_rng(0)
    for variant in presets:
        size = PRESETS[variant]
        base = _group(variant, ())
        variables = random_variables(base, seed=0)
        degraded, pose = (rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32) for _ in range(2))
        context = rng.normal(0, 1, (1, 77, base.unet.config.cross_attention_dim)).astype(np.float32)
        unguided = None
        for guidance, remat in [(0.0, ())] + [(1.0, REMAT_SETS[r]) for r in remats]:
            per_step, compile_s = seconds_per_step(_group(variant, remat), variables, (degraded, pose, context),
                                                   guidance, short, long, repeats)
            unguided = unguided or per_step
            print(f"{variant:<8} {'on' if guidance else 'off':<9} {'+'.join(remat) or 'none':<22} "
                  f"{per_step * 1e3:>10.1f} {per_step / unguided:>11.2f} {compile_s:>10.1f}", flush=True)


def _size(text: str) -> tuple[str, tuple[int, int]]:
    variant, _, hw = text.partition(":")
    h, w = (int(x) for x in hw.lower().split("x"))
    return variant, (h, w)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-sizes", default="tiny:64x64,paper:1024x512",
                        help="variant:HxW, comma-separated ('' skips the memory rows)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--time-presets", default="tiny,mid", help=f"of {sorted(PRESETS)} ('' skips the timing)")
    parser.add_argument("--remat", default=",".join(REMAT_SETS), help=f"guided rows: of {list(REMAT_SETS)}")
    parser.add_argument("--steps-short", type=int, default=2)
    parser.add_argument("--steps-long", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    remats = [r for r in args.remat.split(",") if r]
    for r in remats:
        if r not in REMAT_SETS:
            parser.error(f"--remat {r!r}: expected one of {list(REMAT_SETS)}")
    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} ({jax.default_backend()})")
    load_report("before")
    if args.memory_sizes:
        memory_rows([_size(s) for s in args.memory_sizes.split(",")], remats, args.memory_steps)
    if args.time_presets:
        time_rows(args.time_presets.split(","), remats, args.steps_short, args.steps_long, args.repeats)
    load_report("after")


if __name__ == "__main__":
    main()
