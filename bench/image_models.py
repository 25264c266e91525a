"""Time the VAE decode and the SwinIR forward of ours (jitted) against their PyTorch references, same weights.

    python bench/image_models.py                          # 256 and 512 px, batch 1: ~4 minutes on 2 cores
    python bench/image_models.py --sizes 256 --repeats 3

- VAE decode: the SD2.1-base VAE (configs/diffusers/sd21-base/vae, random weights) decoding a latent of side/8 to a
  side x side image; reference: diffusers' AutoencoderKL.decode.
- SwinIR: DiffBody's stage-0 restorer (configs/swinir.py:variant=diffbir: DiffBIR's general SwinIR, 8 x 6 Swin
  layers on the 8x unshuffled image) on a side x side image; reference: the official definition (spandrel's copy).

fp32, every core, median of --repeats runs after 2 warm-up runs (JAX's first call compiles and is reported apart);
ratio = torch / ours (above 1: ours faster). Prints the load average before and after.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, flax_params, load_report, median_time  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402
from diffbody_jax.interop.swinir import swinir_from_state_dict  # noqa: E402
from diffbody_jax.interop.vae import vae_table  # noqa: E402
from diffbody_jax.models.registry import build_model  # noqa: E402
from diffbody_jax.models.vae import AutoencoderKL  # noqa: E402


def _time_pair(ours, theirs, repeats: int) -> dict:
    start = time.perf_counter()
    out = ours()
    compile_s = time.perf_counter() - start
    ref = theirs()
    err = float(np.abs(np.asarray(out) - ref).max())
    ours_s = median_time(ours, 2, repeats)
    torch_s = median_time(theirs, 2, repeats)
    return dict(ours_ms=ours_s * 1e3, torch_ms=torch_s * 1e3, ratio=torch_s / ours_s, compile_s=compile_s,
                max_abs_err=err)


def vae_decode(side: int, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    config = load_config("vae:variant=sd21-base").model
    ours = build_model(config)
    torch.manual_seed(0)
    ref = TorchVAE.from_config(config.diffusers.to_dict()).eval()
    params = flax_params(ref, ours, vae_table(ours.config), "sd21-base vae")
    z = np.random.default_rng(0).standard_normal((1, 4, side // 8, side // 8)).astype(np.float32)
    decode = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=AutoencoderKL.decode))
    zj, zt = jnp.asarray(z.transpose(0, 2, 3, 1)), torch.from_numpy(z)

    def theirs():
        with torch.inference_mode():
            return ref.decode(zt).sample.numpy().transpose(0, 2, 3, 1)

    return dict(model="VAE decode (sd21-base)", size=side, **_time_pair(
        lambda: decode(params, zj).block_until_ready(), theirs, repeats))


def swinir_forward(side: int, repeats: int) -> dict:
    import torch

    from tests.torch_ref import randomize_, spandrel_swinir_class

    config = build_model(load_config("swinir:variant=diffbir").model).config
    fields = config.to_dict()
    del fields["_class_name"]
    fields["start_unshuffle"] = fields.pop("unshuffle_scale")
    ref = spandrel_swinir_class()(**fields).eval()
    randomize_(ref, 0)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = jax.device_put(swinir_from_state_dict(state, config))
    ours = build_model(load_config("swinir:variant=diffbir").model)
    x = np.random.default_rng(0).uniform(0, 1, (1, side, side, 3)).astype(np.float32)
    forward = jax.jit(lambda p, a: ours.apply({"params": p}, a))
    xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def theirs():
        with torch.inference_mode():
            return ref(xt).numpy().transpose(0, 2, 3, 1)

    return dict(model="SwinIR (diffbir)", size=side, **_time_pair(
        lambda: forward(params, xj).block_until_ready(), theirs, repeats))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--models", default="vae,swinir")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}; expected run time ~4 min for the defaults")
    load_report("before")
    print("| model | size | ours (ms) | torch (ms) | ratio | JAX compile (s) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    runs = {"vae": vae_decode, "swinir": swinir_forward}
    for name in args.models.split(","):
        for side in map(int, args.sizes.split(",")):
            r = runs[name](side, args.repeats)
            print(f"| {r['model']} | {side}x{side} | {r['ours_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f} | "
                  f"{r['compile_s']:.1f} | {r['max_abs_err']:.1e} |", flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
