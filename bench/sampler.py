"""Time a 50-step scan sampler against 50 single jitted UNet forwards and against diffusers' scheduler loop.

  python bench/sampler.py                                   # tiny-sd21 UNet, batch 1, 16x16, DDPM: ~1 min
  python bench/sampler.py --variant mid-sd21 --size 32 --method ddim --cfg-scale 4

All three run the same UNet weights (diffusers' random init, converted) on the same inputs, fp32, on the CPU
with every core. Reported:
  scan overhead = scan sampler time / (50 x one jitted forward) - 1   (goal: <= 5%)
  ratio vs torch = diffusers loop time / scan sampler time           (above 1: ours is faster)
Each time is the median of --repeats runs after one warm-up run (JAX compile time reported separately).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, interleaved_times, load_report, median_time, unet_pair  # noqa: E402

from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler  # noqa: E402
from diffbody_jax.diffusion.schedule import NoiseSchedule  # noqa: E402

TORCH_SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="tiny-sd21", help="a configs/unet.py variant")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--method", default="ddpm", choices=sorted(TORCH_SCHEDULERS))
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    load_report("before")

    unet, ref, params = unet_pair(args.variant)
    c = unet.config
    if c.addition_embed_type:
        raise SystemExit(f"{args.variant}: pick a UNet without size conditioning (the bench passes text only)")

    rng = np.random.default_rng(0)
    b = args.batch
    z_T = rng.standard_normal((b, args.size, args.size, c.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, c.cross_attention_dim)).astype(np.float32)
    null = np.zeros_like(ctx)
    cfg_on = args.cfg_scale != 1.0

    schedule = NoiseSchedule(timestep_spacing="leading", steps_offset=1)
    sampler = make_sampler(lambda p, z, t, cond: unet.apply({"params": p}, z, t, cond), schedule,
                           SamplerConfig(args.method, args.steps, cfg_scale=args.cfg_scale))
    key = jax.random.key(0)
    start = time.perf_counter()
    sampler(key, z_T, ctx, null if cfg_on else None, params=params).sample.block_until_ready()
    compile_s = time.perf_counter() - start
    uncond = null if cfg_on else None

    def scan():
        sampler(key, z_T, ctx, uncond, params=params).sample.block_until_ready()

    forward = jax.jit(lambda p, z, t, ctx: unet.apply({"params": p}, z, t, ctx))
    batch = 2 * b if cfg_on else b
    zf, ctxf = jnp.asarray(np.concatenate([z_T] * (batch // b))), jnp.asarray(np.concatenate([ctx] * (batch // b)))
    steps_t = [jnp.full((batch,), t, jnp.int32) for t in schedule.timesteps(args.steps)]

    def forwards():
        out = None
        for t in steps_t:
            out = forward(params, zf, t, ctxf)
        out.block_until_ready()

    # interleaved, so that drift of the machine's speed hits both alike; medians of each and of the pair ratios
    scan_s, forwards_s, overhead = interleaved_times(scan, forwards, args.repeats)

    scheduler = TORCH_SCHEDULERS[args.method].from_config(dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1,
        clip_sample=False))
    z_t, ctx_t = torch.from_numpy(z_T.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx)
    ctx_both = torch.cat([torch.from_numpy(null), ctx_t])

    def torch_loop():
        scheduler.set_timesteps(args.steps)
        z = z_t
        with torch.inference_mode():
            for t in scheduler.timesteps:
                if cfg_on:
                    u, cnd = ref(torch.cat([z, z]), t, ctx_both).sample.chunk(2)
                    out = u + args.cfg_scale * (cnd - u)
                else:
                    out = ref(z, t, ctx_t).sample
                z = scheduler.step(out, t, z).prev_sample
        return z

    torch_s = median_time(torch_loop, 1, args.repeats)

    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"# {args.variant}, batch {b}, {args.size}x{args.size} latents, {args.method} {args.steps} steps, "
          f"cfg {args.cfg_scale}")
    print(f"scan sampler        {scan_s * 1e3:9.1f} ms   (compile {compile_s:.1f} s)")
    print(f"{args.steps} jitted forwards  {forwards_s * 1e3:9.1f} ms")
    print(f"diffusers loop      {torch_s * 1e3:9.1f} ms")
    print(f"scan overhead       {100 * overhead:+.1f} %   (median of {args.repeats} interleaved pairs)")
    print(f"ratio vs torch      {torch_s / scan_s:.2f}")
    load_report("after")


if __name__ == "__main__":
    main()
