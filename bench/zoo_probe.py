"""Where a trained zoo loses quality, stage by stage, on its held-out photo and on photos it trained on.

    python bench/zoo_probe.py ZOO [--seeds 3] [--in-sample 2]

ZOO is a `diffbody demo --retrain` / `train_zoo` folder (ZOO/weights, ZOO/data). For each photo (64 x 64 central
square, the demo's seeded Real-ESRGAN degradation) it prints RGB PSNR (dB) of:
  degraded       the input
  x4 bound       the clean photo area-downsampled x4 and bicubic-upsampled: what the degraded input could carry
  vae(clean)     the zoo's VAE reconstruction of the clean photo: a bound on every diffusion output
  I_reg          the zoo's SwinIR on the degraded input; vae(I_reg): its latent, decoded (what v1 is given)
  x0@t           v1's x0 estimate from z_t = q(z_clean, t) with its ControlNet (cn) and without (base: the
                 ControlNet's residuals left out): at t = 999 it is the model's estimate of E[x0 | condition],
                 the MMSE output a sample scatters around (a calibrated sampler's sample has about twice its error)
Not timed; ~1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.data.degradations import resize
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.diffusion.schedule import predict_x0
from diffbody_jax.evaluation.held_out import held_out_inputs
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings

SIZE = 64
TIMESTEPS = (999, 700, 400, 100)


def psnr(image, clean) -> float:
    image = np.round(np.clip(np.asarray(image, np.float64), 0, 1) * 255) / 255
    return float(10 * np.log10(1 / np.mean((image - np.asarray(clean, np.float64)) ** 2)))


def probe(restorer: Restorer, photo) -> dict[str, float]:
    """The PSNRs above for one HeldOut record."""
    pipe, variables = restorer.pipeline, restorer.variables
    clean, degraded = jnp.asarray(photo.clean[None]), jnp.asarray(photo.degraded[None])
    low = resize(photo.clean, (SIZE // 4, SIZE // 4), "area")
    row = {"degraded": psnr(degraded[0], photo.clean), "x4 bound": psnr(resize(low, (SIZE, SIZE)), photo.clean)}
    z = pipe.encode(variables, clean)
    row["vae(clean)"] = psnr(pipe.decode(variables, z)[0], photo.clean)
    i_reg = pipe.regress(variables, degraded)
    row["I_reg"] = psnr(i_reg[0], photo.clean)
    pose = jnp.asarray(restorer.pose_style.render(photo.keypoints, photo.keypoint_format, (SIZE, SIZE))[None])
    control = pipe.condition(variables, i_reg, pose, pipe.attention(variables, i_reg).latent)
    row["vae(I_reg)"] = psnr(pipe.decode(variables, control[..., : z.shape[-1]])[0], photo.clean)
    context = jnp.asarray(restorer.conditioning([photo.caption], (SIZE, SIZE))[0])
    params = {"unet": variables["params"]["unet"], "controlnet": variables["params"]["controlnet"]}
    base = {"unet": params["unet"], "controlnet": jax.tree.map(jnp.zeros_like, params["controlnet"])}
    alphas = pipe.schedule.alphas_cumprod()
    model = jax.jit(pipe._eps)  # the pipeline's one denoiser call (ControlNet residuals into the UNet)
    for t in TIMESTEPS:
        a = float(alphas[t])
        z_t = a ** 0.5 * z + (1 - a) ** 0.5 * jax.random.normal(jax.random.key(t), z.shape)
        for name, p in (("cn", params), ("base", base)):
            out = model(p, z_t, jnp.full((1,), t), (context, control))
            x0 = predict_x0(out, z_t, a, pipe.schedule.prediction_type)
            row[f"x0@{t} {name}"] = psnr(pipe.decode(variables, x0)[0], photo.clean)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--seeds", type=int, default=3, help="degradation seeds per photo")
    parser.add_argument("--in-sample", type=int, default=2, help="training crops of people to probe as well")
    args = parser.parse_args(argv)
    restorer = Restorer(args.zoo / "weights", RestoreSettings(version="v1", size=SIZE, square_only=True))
    people = read_manifest(args.zoo / "data" / "people.jsonl")
    groups = {"held-out": read_manifest(args.zoo / "data" / "held_out.jsonl")}
    stride = max(1, len(people) // max(1, args.in_sample))
    groups.update({f"in-sample {Path(r.image).stem}": [r] for r in people[::stride][: args.in_sample]})
    for name, records in groups.items():
        rows = [probe(restorer, held_out_inputs(records, SIZE, seed)[0]) for seed in range(args.seeds)]
        mean = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
        print(f"{name} (mean of {args.seeds} degradation seeds)")
        print("  " + "  ".join(f"{k} {v:.2f}" for k, v in mean.items() if not k.startswith("x0@")))
        for t in TIMESTEPS:
            print(f"  x0@{t}: cn {mean[f'x0@{t} cn']:.2f}  base {mean[f'x0@{t} base']:.2f}")


if __name__ == "__main__":
    main()
