"""Restoration throughput: DiffBody v1 as one jitted batch program, against the same pipeline driven step by step
from Python, and against diffusers' SD2.1 ControlNet img2img pipeline with the same models' sizes and steps.

  python bench/restore.py                       # tiny and mid presets, batch 1 and 8, DDIM 10 steps (~10 minutes)
  python bench/restore.py --presets tiny --batches 1 --steps 4

Presets (random weights; `pipelines.stand_in`): tiny = the tiny v1 members at 64 x 64 pixels; mid = configs/
v1_controlnet.py's `mid` variant (mid-sd21's 142 M-param UNet and its v1 ControlNet, the tiny4 VAE at 1/8) at
256 x 256 pixels. Reported per (preset, batch), in images/s: the jitted program (`Restorer.restore`: SwinIR, the
attention map, the condition, a lax.scan DDIM sampler and the decode in one program), the same stages jitted one by
one with the sampler's steps looped in Python (one jitted ControlNet + UNet call and one jitted update per step), and
diffusers' StableDiffusionControlNetImg2ImgPipeline (strength 1, no CFG: text encoding, the same number of
ControlNet + UNet steps, VAE encode and decode; it has no SwinIR or part network, so it does a little less work).
Ratios above 1 mean ours is faster. Each time is the median of --repeats runs after one warm-up (compile excluded).
The load average is printed before and after: torch's OpenMP threads slow down far more than XLA under load, so a
loaded machine inflates our ratio; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_description, load_report, median_time  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402
from diffbody_jax.diffusion.samplers import _step_tables  # noqa: E402
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings  # noqa: E402
from diffbody_jax.pipelines.stand_in import write_stand_in_weights  # noqa: E402

PRESETS = {"tiny": ("tiny", 64, ("tiny-sd21", "tiny", "tiny")), "mid": ("mid", 256, ("mid-sd21", "tiny4", "mid"))}


def python_loop(restorer: Restorer):
    """The v1 pipeline's stages, each jitted alone, with the DDIM steps looped in Python."""
    pipe = restorer.pipeline
    tables = {k: jnp.asarray(v) for k, v in _step_tables(pipe.schedule, pipe.sampler_config).items()}
    regress, attention = jax.jit(pipe.regress), jax.jit(pipe.attention)
    condition, decode = jax.jit(pipe.condition), jax.jit(pipe.decode)
    eps = jax.jit(pipe._eps_whole)

    @jax.jit
    def ddim(z, out, a_t, a_prev):
        x0 = (z - jnp.sqrt(1 - a_t) * out) / jnp.sqrt(a_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * out

    def run(variables, key, degraded, pose, context):
        i_reg = regress(variables, degraded)
        attn = attention(variables, i_reg)
        control = condition(variables, i_reg, pose, attn.latent)
        b, h, w, _ = control.shape
        z = jax.random.normal(key, (b, h, w, pipe.group.unet.config.out_channels))
        params = {"unet": variables["params"]["unet"], "controlnet": variables["params"]["controlnet"]}
        for i in range(len(tables["t"])):
            t = jnp.full((b,), tables["t"][i], jnp.int32)
            z = ddim(z, eps(params, z, t, (context, control)), tables["a_t"][i], tables["a_prev"][i])
        return decode(variables, z)

    return run


def diffusers_pipeline(unet_variant: str, vae_variant: str, clip_variant: str):
    import diffusers
    import torch
    import transformers

    from diffbody_jax.conditioning.prompts import load_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**load_config(f"unet:variant={unet_variant}").model.diffusers.to_dict())
    vae_config = load_config(f"vae:variant={vae_variant}").model.diffusers.to_dict()
    vae = diffusers.AutoencoderKL(**vae_config)
    # the pixel condition's embedding downsamples to the latent grid: one stride-2 level per VAE factor of 2
    levels = len(vae_config["block_out_channels"])
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **load_config(f"clip:variant={clip_variant}").model.transformers.to_dict()))
    scheduler = diffusers.DDIMScheduler.from_pretrained(str(REPO / "configs/diffusers/sd21-base/scheduler"))
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=load_tokenizer(None, "!"), unet=unet.eval(),
        controlnet=controlnet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(preset: str, b: int, size: int, restorer, loop, torch_pipe, steps: int, repeats: int) -> dict:
    """images/s of the jitted program, the Python-driven loop and (given) the diffusers pipeline at batch b."""
    import torch

    rng = np.random.default_rng(b)
    degraded = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    prompts = ["a photo of a person"] * b
    key = jax.random.key(0)
    start = time.perf_counter()
    restorer.restore(key, degraded, pose, prompts)
    compile_s = time.perf_counter() - start
    jitted = median_time(lambda: restorer.restore(key, degraded, pose, prompts), 0, repeats)
    context = restorer.conditioning(prompts, (size, size))[0]
    looped = median_time(lambda: np.asarray(loop(restorer.variables, key, degraded, pose, context)), 1, repeats)
    row = {"preset": preset, "batch": b, "jit": b / jitted, "loop": b / looped, "compile_s": compile_s}
    if torch_pipe is not None:
        image, control = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (degraded, pose))

        def run_torch():
            with torch.inference_mode():
                torch_pipe(prompt=prompts, image=image, control_image=control, num_inference_steps=steps,
                           strength=1.0, guidance_scale=1.0, height=size, width=size, output_type="np")

        row["torch"] = b / median_time(run_torch, 1, repeats)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,mid")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers pipeline")
    args = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}, {jax.local_device_count()} device(s)), torch {torch.__version__}")
    print(f"# v1, DDIM {args.steps} steps, fp32, no CFG, random weights; images/s (higher is better)")
    load_report("before")
    rows = []
    for preset in args.presets.split(","):
        variant, size, torch_variants = PRESETS[preset]
        folder = Path(tempfile.mkdtemp(prefix=f"bench-restore-{preset}-"))
        weights = write_stand_in_weights(folder, v1_variant=variant, versions=("v1",))
        restorer = Restorer(weights, RestoreSettings(version="v1", steps=args.steps, sampler="ddim", size=size,
                                                     square_only=True))
        loop = python_loop(restorer)
        torch_pipe = None if args.no_torch else diffusers_pipeline(*torch_variants)
        for b in map(int, args.batches.split(",")):
            row = measure(preset, b, size, restorer, loop, torch_pipe, args.steps, args.repeats)
            rows.append(row)
            torch_text = (f"diffusers {row['torch']:7.2f}  jit/diffusers {row['jit'] / row['torch']:5.2f}"
                          if "torch" in row else "")
            print(f"{preset:>5} batch {b}: jit {row['jit']:7.2f}  python loop {row['loop']:7.2f}  "
                  f"jit/loop {row['jit'] / row['loop']:5.2f}  {torch_text}  (compile {row['compile_s']:.1f} s)",
                  flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
