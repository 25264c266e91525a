"""Memory of one part-loss guidance gradient (VAE decode -> body-part net -> Eq. 6 -> d/dz), from XLA.

    python bench/part_guidance_memory.py                        # tiny and SD2.1 VAE, 512 x 512, BPBreID W32
    python bench/part_guidance_memory.py --vae sdxl-base --size 1024

Compiles `jax.grad` of the guidance loss with respect to the latents for abstract inputs (no weights are
loaded or allocated) without and with remat in the VAE, and with the query-chunked attention backend
(the VAE's mid-block self-attention spans the whole latent), and prints `compiled.memory_analysis()`:
temp (XLA's scratch: the activations kept for the backward pass), arguments (weights + inputs) and
their sum, the peak the program needs on the device it was compiled for.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import load_report  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402
from diffbody_jax.diffusion.part_guidance import PartLossConfig, make_part_guidance, part_guidance_aux  # noqa: E402
from diffbody_jax.models.registry import build_model  # noqa: E402
from diffbody_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MiB = 2**20


def measure(vae_variant: str, size: int, bodypart: str, remat: bool, attention: str, batch: int) -> dict:
    vae_config = VAEConfig.from_dict(load_config(f"{REPO}/configs/vae.py:variant={vae_variant}").model.diffusers)
    vae = AutoencoderKL(vae_config, remat=remat, attention_backend=attention)
    net = build_model(load_config(f"{REPO}/configs/bodypart.py:variant={bodypart}").model)
    guidance = make_part_guidance(vae, net, PartLossConfig())
    f = vae_config.downsample_factor
    z = jax.ShapeDtypeStruct((batch, size // f, size // f, vae_config.latent_channels), jnp.float32)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    aux = jax.eval_shape(lambda v, p, i: part_guidance_aux(net, v, p, i), net.variable_shapes(), vae.param_shapes(),
                         image)
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(lambda z, aux: guidance(z, 0, aux).sum())).lower(z, aux).compile()
    stats = compiled.memory_analysis()
    return dict(temp=stats.temp_size_in_bytes / MiB, args=stats.argument_size_in_bytes / MiB,
                out=stats.output_size_in_bytes / MiB, compile_s=time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="tiny,sd21-base", help="comma-separated configs/vae.py variants")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bodypart", choices=("bpbreid", "tiny"), default="bpbreid")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), image {args.size}x{args.size}, "
          f"batch {args.batch}, body-part net {args.bodypart}; expected run time ~3 min (compiles only)")
    load_report("before")
    print(f"{'vae':<12} {'remat':<6} {'attention':<10} {'temp MiB':>10} {'args MiB':>10} {'peak MiB':>10} "
          f"{'compile s':>10}")
    for variant in args.vae.split(","):
        for remat, attention in ((False, "einsum"), (True, "einsum"), (True, "chunked")):
            m = measure(variant, args.size, args.bodypart, remat, attention, args.batch)
            print(f"{variant:<12} {remat!s:<6} {attention:<10} {m['temp']:>10.1f} {m['args']:>10.1f} "
                  f"{m['temp'] + m['args'] + m['out']:>10.1f} {m['compile_s']:>10.1f}", flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
