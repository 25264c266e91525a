"""Time our jitted UNet (and UNet + ControlNet) forward against diffusers' PyTorch forward, same weights and inputs.

  python bench/unet_forward.py                                  # mid-sd21 and sd21-base, 32x32 latents: ~4 min
  python bench/unet_forward.py --variants tiny-sdxl --batch 1 --size 16 --controlnet on

--controlnet off|on|both: the UNet alone, the UNet steered by a ControlNet built from it (diffusers'
`ControlNetModel.from_unet`: pixel condition at 8x the latent size, residuals into the UNet), or both rows.

Both sides run fp32 on the CPU with every core; each time is the median of --repeats runs after
--warmup runs (for JAX, the first call compiles and is reported separately). ratio = torch / ours, so
a ratio above 1.0 means our forward is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import ControlNetModel as TorchControlNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, flax_params, load_report, median_time, unet_pair  # noqa: E402

from diffbody_jax.interop.unet import controlnet_table  # noqa: E402
from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel  # noqa: E402


def bench(variant: str, batch: int, size: int, warmup: int, repeats: int, controlnet: bool) -> dict:
    ours, ref, unet_params = unet_pair(variant)
    params = {"unet": unet_params}
    n_params = sum(p.numel() for p in ref.parameters())
    if controlnet:
        ref_cn = TorchControlNet.from_unet(ref).eval()
        ours_cn = ControlNetModel(ControlNetConfig.from_unet(ours.config), dtype=ours.dtype,
                                  attention_backend=ours.attention_backend)
        params["controlnet"] = flax_params(ref_cn, ours_cn, controlnet_table(ours_cn.config), variant)
        n_params += sum(p.numel() for p in ref_cn.parameters())

    c = ours.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c.in_channels, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, 77, c.cross_attention_dim)).astype(np.float32)
    added = {}
    if c.addition_embed_type == "text_time":
        added = dict(text_embeds=rng.standard_normal((batch, c.text_embeds_dim)).astype(np.float32),
                     time_ids=np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1)))

    cond = rng.uniform(-1, 1, (batch, 3, 8 * size, 8 * size)).astype(np.float32)
    x_t, t_t, ctx_t, cond_t = (torch.from_numpy(a) for a in (x, t, ctx, cond))
    added_t = {k: torch.from_numpy(v) for k, v in added.items()}

    def torch_forward():
        with torch.inference_mode():
            kw = {}
            if controlnet:
                down, mid = ref_cn(x_t, t_t, ctx_t, cond_t, added_cond_kwargs=added_t or None, return_dict=False)
                kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            return ref(x_t, t_t, ctx_t, added_cond_kwargs=added_t or None, **kw).sample

    @jax.jit
    def forward(p, x, t, ctx, cond, added):
        kw = {}
        if controlnet:
            res = ours_cn.apply({"params": p["controlnet"]}, x, t, ctx, cond, **added)
            kw = dict(down_residuals=res.down, mid_residual=res.mid)
        return ours.apply({"params": p["unet"]}, x, t, ctx, **added, **kw)

    x_j, t_j, ctx_j = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)
    cond_j = jnp.asarray(cond.transpose(0, 2, 3, 1))
    added_j = {k: jnp.asarray(v) for k, v in added.items()}

    def jax_forward():
        return forward(params, x_j, t_j, ctx_j, cond_j, added_j).block_until_ready()

    start = time.perf_counter()
    out = jax_forward()
    compile_s = time.perf_counter() - start
    err = float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - torch_forward().numpy()).max())

    ours_s = median_time(jax_forward, warmup, repeats)
    torch_s = median_time(torch_forward, warmup, repeats)
    name = variant + ("+controlnet" if controlnet else "")
    return dict(variant=name, params_m=round(n_params / 1e6, 1), batch=batch, latent=size,
                ours_ms=round(ours_s * 1e3, 1), torch_ms=round(torch_s * 1e3, 1),
                ratio=round(torch_s / ours_s, 3), jax_compile_s=round(compile_s, 1), max_abs_err=err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="mid-sd21,sd21-base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--controlnet", default="both", choices=["off", "on", "both"])
    args = parser.parse_args()
    with_controlnet = {"off": [False], "on": [True], "both": [False, True]}[args.controlnet]

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"# machine: {cpu_description()}, {threads} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    load_report("before")
    print(f"{'variant':<22} {'params':>8} {'batch':>5} {'latent':>6} {'ours ms':>9} {'torch ms':>9} "
          f"{'ratio':>6} {'compile s':>9} {'max err':>9}")
    runs = [(v, cn) for v in args.variants.split(",") for cn in with_controlnet]
    for variant, controlnet in runs:
        r = bench(variant, args.batch, args.size, args.warmup, args.repeats, controlnet)
        print(f"{r['variant']:<22} {r['params_m']:>7}M {r['batch']:>5} {r['latent']:>6} {r['ours_ms']:>9} "
              f"{r['torch_ms']:>9} {r['ratio']:>6} {r['jax_compile_s']:>9} {r['max_abs_err']:>9.2e}")
        print("json:", json.dumps(r))
    load_report("after")


if __name__ == "__main__":
    main()
