"""Training cost: our jitted train step against PyTorch/diffusers doing the same step, each side in a process of its
own.

  python bench/train_step.py            # the UNet and the v1 ControlNet at tiny 4x32x32, mid 2x32x32, base 1x64x64
  python bench/train_step.py --rows tiny-sd21:4x32,controlnet/tiny-v1:4x32 --repeats 3

A row is a UNet variant of configs/unet.py, or controlnet/<variant of configs/controlnet.py>, at batch x latent
side. UNet rows: one step = UNet forward on noised latents, MSE against the noise, backward, AdamW update of the
whole UNet. ControlNet rows (the v1 phase): the ControlNet takes the latent condition ([B, H, W, 9] for v1), its
residuals steer the frozen UNet, and only the ControlNet is updated; the torch side is tests/torch_ref.py's twin
(diffusers' ControlNetModel with the latent embedding) over diffusers' UNet2DConditionModel. fp32, CPU, every core,
the same weights and inputs on both sides.

A row's weights are torch's random init (seed 0; the ControlNet's randomised, its zero convs included, so every
layer gets a gradient), written once to safetensors files by a child process; then one child runs our step (the
weights converted by our interop tables, no torch module built) and another runs torch's, one after the other:
sd21-base's params, gradients and AdamW moments take about 14 GB per framework, so two cannot share a 24 GB
process. Each child reports the median step time over max(--repeats, enough steps to fill --min-seconds) after
--warmup steps (single steps of the tiny rows drift by +-20%), the first step's loss (equal on both sides: the
same step) and its peak RSS. ratio = torch s / ours s: above 1.0, our step is faster. Both children run with
the malloc setting `diffbody` itself runs with (glibc's malloc on transparent huge pages, diffbody_jax/host_memory.py;
--no-hugepages: glibc's default for both). The state per device of the
papers' phases at scale is bench/train_plan.py's (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ",".join(f"{kind}:{shape}" for shape_kinds in (
    ("tiny-sd21", "controlnet/tiny-v1", "4x32"), ("mid-sd21", "controlnet/mid-v1", "2x32"),
    ("sd21-base", "controlnet/diffbody-v1", "1x64")) for shape in shape_kinds[-1:] for kind in shape_kinds[:-1])


def _parts(row_variant: str) -> tuple[str, str | None]:
    """(UNet variant, ControlNet variant or None) of a row."""
    if row_variant.startswith("controlnet/"):
        from configs.controlnet import FROM_UNET

        name = row_variant.split("/", 1)[1]
        if name not in FROM_UNET:
            raise SystemExit(f"--rows: unknown ControlNet variant {name!r}; known: {sorted(FROM_UNET)}")
        return FROM_UNET[name][0], name
    return row_variant, None


def _inputs(row_variant: str, batch: int, size: int) -> dict:
    """The step's inputs (NCHW), drawn alike in every child."""
    import numpy as np

    from diffbody_jax.config import load_config
    from diffbody_jax.models.controlnet import build_controlnet
    from diffbody_jax.models.unet import build_unet

    unet_variant, cn_variant = _parts(row_variant)
    c = build_unet(load_config(f"unet:variant={unet_variant}").model).config
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, c.in_channels, size, size)).astype(np.float32)
    out = {"z": z, "eps": rng.standard_normal(z.shape).astype(np.float32), "t": rng.integers(0, 1000, batch),
           "ctx": rng.standard_normal((batch, 77, c.cross_attention_dim)).astype(np.float32)}
    if cn_variant:
        cn = build_controlnet(load_config(f"controlnet:variant={cn_variant}").model).config
        side = size * cn.condition_downscale
        out["cond"] = rng.uniform(-1, 1, (batch, cn.conditioning_channels, side, side)).astype(np.float32)
    return out


def _torch_models(row_variant: str):
    """(UNet, ControlNet or None) as torch modules of the row's configs, torch's random init under seed 0."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffbody_jax.config import load_config
    from tests.torch_ref import controlnet_diffusers_config, torch_controlnet

    unet_variant, cn_variant = _parts(row_variant)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_config(f"unet:variant={unet_variant}").model.diffusers.to_dict())
    cn = torch_controlnet(controlnet_diffusers_config(cn_variant), seed=0) if cn_variant else None
    return unet, cn


def write_weights(row_variant: str, folder: str) -> dict:
    from safetensors.torch import save_file

    params = 0
    for name, module in zip(("unet", "controlnet"), _torch_models(row_variant), strict=True):
        if module is not None:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, f"{folder}/{name}.safetensors")
            params += sum(p.numel() for p in module.parameters())
    return {"params_m": round(params / 1e6, 1)}


def _timed(step, warmup: int, repeats: int, min_seconds: float) -> float:
    import math
    import time

    from common import median_time

    for _ in range(max(warmup - 1, 0)):
        step()
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    return median_time(step, 0, max(repeats, math.ceil(min_seconds / max(once, 1e-3))))


def torch_side(row_variant: str, folder: str, batch: int, size: int, args) -> dict:
    import torch
    from common import torch_controlnet_train_step, torch_unet_train_step
    from safetensors.torch import load_file

    torch.set_num_threads(os.cpu_count())
    unet, cn = _torch_models(row_variant)
    unet.load_state_dict(load_file(f"{folder}/unet.safetensors"))
    x = {k: torch.from_numpy(v) for k, v in _inputs(row_variant, batch, size).items()}
    if cn is None:
        step = torch_unet_train_step(unet, x["z"], x["t"], x["ctx"], x["eps"])
    else:
        cn.load_state_dict(load_file(f"{folder}/controlnet.safetensors"))
        step = torch_controlnet_train_step(unet, cn, x["z"], x["t"], x["ctx"], x["cond"], x["eps"])
    first = step()
    return {"seconds": _timed(step, args.warmup, args.repeats, args.min_seconds), "first_loss": first}


def _our_params(model, table, path: str):
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from diffbody_jax.interop.mapping import torch_to_flax

    host = torch_to_flax(load_file(path), table, model.param_shapes(), path)
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), host)  # owned by XLA, so the host copy can go
    del host
    gc.collect()
    return params


def ours_side(row_variant: str, folder: str, batch: int, size: int, args) -> dict:
    from common import jax_controlnet_train_step, jax_unet_train_step

    from diffbody_jax.config import load_config
    from diffbody_jax.interop.unet import controlnet_table, unet_table
    from diffbody_jax.models.controlnet import build_controlnet
    from diffbody_jax.models.unet import build_unet

    unet_variant, cn_variant = _parts(row_variant)
    unet = build_unet(load_config(f"unet:variant={unet_variant}").model)
    unet_params = _our_params(unet, unet_table(unet.config), f"{folder}/unet.safetensors")
    x = {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for k, v in _inputs(row_variant, batch, size).items()}
    if cn_variant is None:
        step, compiled = jax_unet_train_step(unet, unet_params, x["z"], x["t"], x["ctx"], x["eps"])
    else:
        cn = build_controlnet(load_config(f"controlnet:variant={cn_variant}").model)
        cn_params = _our_params(cn, controlnet_table(cn.config), f"{folder}/controlnet.safetensors")
        step, compiled = jax_controlnet_train_step(unet, cn, unet_params, cn_params, x["z"], x["t"], x["ctx"],
                                                   x["cond"], x["eps"])
    del unet_params
    memory = compiled.memory_analysis()
    first = step()
    return {"seconds": _timed(step, args.warmup, args.repeats, args.min_seconds), "first_loss": first,
            "xla_temporaries_gb": memory.temp_size_in_bytes / 2**30}  # GiB


def child(args) -> None:
    sys.path.insert(0, str(REPO))
    if args.child == "weights":
        out = write_weights(args.variant, args.weights)
    else:
        side = torch_side if args.child == "torch" else ours_side
        out = side(args.variant, args.weights, args.batch, args.size, args)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def run_child(what: str, variant: str, weights: str, args, batch: int = 0, size: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--variant", variant, "--weights", weights,
           "--batch", str(batch), "--size", str(size), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--min-seconds", str(args.min_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=args.environ)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        killed = proc.returncode == -9  # the kernel's out-of-memory killer, most likely
        why = "killed (SIGKILL: out of memory?)" if killed else f"exit {proc.returncode}"
        print(f"# the {what} child of {variant} failed: {why}\n{proc.stderr[-2000:] if not killed else ''}",
              file=sys.stderr, flush=True)
        return {"failed": why}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=ROWS, help="VARIANT:BATCHxSIDE,... (VARIANT: a UNet variant or "
                   "controlnet/<ControlNet variant>; SIDE: the latents' height and width)")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing, the first (compiling) included")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=10.0, help="time at least this long per side and row")
    p.add_argument("--json", help="also write the rows here (JSON lines)")
    p.add_argument("--no-hugepages", action="store_true", help="both children with glibc's default malloc, not on "
                   "the transparent huge pages `diffbody` asks for (diffbody_jax/host_memory.py)")
    p.add_argument("--child", choices=("weights", "ours", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(REPO))
    import jax
    import torch
    from common import child_environment, cpu_description, load_report

    args.environ, malloc = child_environment(not args.no_hugepages)
    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}; train step, fp32, median of at least "
          f"{args.repeats} steps and {args.min_seconds:g} s; {malloc}")
    load_report("before")
    print("| variant | params | batch x latent | ours s | torch s | ratio | first loss ours / torch | "
          "peak RSS GB ours / torch | XLA temporaries GiB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for row in filter(None, args.rows.split(",")):
        variant, shape = row.split(":")
        batch, size = (int(v) for v in shape.split("x"))
        with tempfile.TemporaryDirectory() as weights:
            made = run_child("weights", variant, weights, args)
            ours = run_child("ours", variant, weights, args, batch, size)
            ref = run_child("torch", variant, weights, args, batch, size)
        if "failed" in ours or "failed" in ref or "failed" in made:
            print(f"| {variant} | - | {batch}x{size}x{size} | {ours.get('failed', '')} | {ref.get('failed', '')} | - | "
                  f"- | - |", flush=True)
            continue
        r = {"variant": variant, "params_m": made["params_m"], "batch": batch, "latent": size,
             "ours_s": ours["seconds"], "torch_s": ref["seconds"], "ratio": ref["seconds"] / ours["seconds"],
             "first_loss": [ours["first_loss"], ref["first_loss"]],
             "peak_rss_gb": [ours["peak_rss_gb"], ref["peak_rss_gb"]],
             "xla_temporaries_gib": ours["xla_temporaries_gb"]}
        print(f"| {variant} | {r['params_m']}M | {batch}x{size}x{size} | {r['ours_s']:.3f} | {r['torch_s']:.3f} | "
              f"{r['ratio']:.2f} | {ours['first_loss']:.5f} / {ref['first_loss']:.5f} | "
              f"{ours['peak_rss_gb']:.2f} / {ref['peak_rss_gb']:.2f} | {ours['xla_temporaries_gb']:.2f} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    load_report("after")


if __name__ == "__main__":
    main()
