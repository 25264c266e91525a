"""Scanned against unrolled transformer stacks (`scan_layers`): compile time, XLA's temporaries, and run time.

    python bench/scan_layers.py                                   # SDXL-base UNet compile, SDXL's depth-10 stack run
    python bench/scan_layers.py --compile-variant tiny-sdxl --compile-latent 16 --stack 2x16x320 --repeats 2

Compile: the UNet of --compile-variant (configs/unet.py; sdxl-base by default, the papers' stage-2 UNet: transformer
stacks of depth 2 and 10) for abstract weights (nothing allocated), batch 1, --compile-latent square latents, 77
tokens, float32. Two programs: the forward, and the gradient of a squared-output loss in the params (what a train
step differentiates). Each is lowered and compiled once per layout; XLA's temporaries come from `memory_analysis`.

Run: one Transformer2D of --stack DEPTHxSIDExWIDTH (default 10x32x1280: SDXL's lowest level at 1024 px; head dim 64,
context 77 x 2048) with random weights, forward and the same gradient, timed as the median of --repeats calls
alternating the two layouts (`interleaved_times`). A stack is the only part scanning changes, so its ratio bounds
the whole UNet's, where convolutions and ResNets are common to both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, interleaved_times, load_report  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402
from diffbody_jax.models.layers import Transformer2D  # noqa: E402
from diffbody_jax.models.registry import build_model  # noqa: E402
from diffbody_jax.models.stacked_blocks import stack_blocks  # noqa: E402

GIB = 2**30


def _loss(module, inputs):
    def loss(params):
        out = module.apply({"params": params}, **inputs)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))
    return loss


def compile_rows(variant: str, latent: int) -> None:
    unet = build_model(load_config(f"unet:variant={variant}").model)
    inputs = unet.dummy_inputs(1, latent)
    print(f"\n## compile: {variant} UNet, batch 1, {latent}x{latent} latents, abstract weights, float32")
    print(f"{'program':9} {'layout':9} {'lower s':>8} {'compile s':>10} {'temporaries GiB':>16}")
    for program in ("forward", "gradient"):
        for scan in (False, True):
            module = unet.clone(scan_layers=scan)
            params = module.param_shapes()
            fn = (lambda p, m=module: m.apply({"params": p}, **inputs)) if program == "forward" else \
                jax.grad(_loss(module, inputs))
            start = time.perf_counter()
            lowered = jax.jit(fn).lower(params)
            lowered_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - start
            temps = compiled.memory_analysis().temp_size_in_bytes / GIB
            print(f"{program:9} {'scanned' if scan else 'unrolled':9} {lowered_s:8.1f} {compile_s:10.1f} "
                  f"{temps:16.2f}", flush=True)


def run_rows(depth: int, side: int, width: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, side, side, width)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 77, 2048)), jnp.float32)
    unrolled = Transformer2D(width // 64, 64, depth, use_linear_projection=True)
    scanned = unrolled.clone(scan_blocks=True)
    params = nn.unbox(jax.jit(unrolled.init)(jax.random.key(0), x, context))["params"]
    stacked = stack_blocks(params)
    print(f"\n## run: Transformer2D depth {depth}, {side}x{side} tokens, width {width}, batch 1, float32; "
          f"median of {repeats} alternating calls")
    print(f"{'program':9} {'unrolled ms':>12} {'scanned ms':>11} {'scanned / unrolled':>19} "
          f"{'temporaries GiB (unrolled, scanned)':>36}")
    for program in ("forward", "gradient"):
        calls, temps = [], []
        for module, p in ((unrolled, params), (scanned, stacked)):
            fn = (lambda q, m=module: m.apply({"params": q}, x, context)) if program == "forward" else \
                jax.grad(lambda q, m=module: jnp.mean(jnp.square(m.apply({"params": q}, x, context))))
            compiled = jax.jit(fn).lower(p).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes / GIB)
            calls.append(lambda c=compiled, q=p: jax.block_until_ready(c(q)))
        a, b, _ = interleaved_times(calls[0], calls[1], repeats)
        print(f"{program:9} {a * 1e3:12.1f} {b * 1e3:11.1f} {b / a:19.2f} {temps[0]:17.2f}, {temps[1]:.2f}",
              flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-variant", default="sdxl-base", help="configs/unet.py variant ('' skips compiling)")
    p.add_argument("--compile-latent", type=int, default=128, help="latent side (128: 1024 px)")
    p.add_argument("--stack", default="10x32x1280", help="DEPTHxSIDExWIDTH of the timed stack ('' skips running)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"# {cpu_description()}, jax {jax.__version__}")
    load_report("before")
    if args.compile_variant:
        compile_rows(args.compile_variant, args.compile_latent)
    if args.stack:
        depth, side, width = (int(v) for v in args.stack.split("x"))
        run_rows(depth, side, width, args.repeats)
    load_report("after")


if __name__ == "__main__":
    main()
