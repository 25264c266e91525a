"""Training cost: our jitted train step against PyTorch/diffusers doing the same step, each side in a process of its
own.

  python bench/train_step.py                                # tiny-sd21 4x32x32, mid-sd21 2x32x32, sd21-base 1x64x64
  python bench/train_step.py --rows tiny-sd21:4x32 --repeats 3

One step = UNet forward on noised latents, MSE against the noise, backward, AdamW update (fp32, CPU, every core),
the same weights and inputs on both sides. A row's weights are diffusers' random init under seed 0, written once to
a safetensors file by a child process; then one child runs our step (the weights converted by our interop table,
no torch module built) and another runs torch's, one after the other: sd21-base's params, gradients and AdamW
moments take about 14 GB per framework, so two cannot share a 24 GB process. Each child reports the median step
time over --repeats steps after --warmup steps, the first step's loss (equal on both sides: the same step) and its
peak RSS. ratio = torch s / ours s: above 1.0, our step is faster. The state per device of the papers' phases at
scale is bench/train_plan.py's (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = "tiny-sd21:4x32,mid-sd21:2x32,sd21-base:1x64"  # variant:batch x latent side (the zoo's, issue 33's)
LR = 1e-5


def _inputs(variant: str, batch: int, size: int) -> dict:
    """The step's inputs (NCHW latents), drawn alike in every child."""
    import numpy as np

    from diffbody_jax.config import load_config
    from diffbody_jax.models.unet import build_unet

    c = build_unet(load_config(f"unet:variant={variant}").model).config
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, c.in_channels, size, size)).astype(np.float32)
    return {"z": z, "eps": rng.standard_normal(z.shape).astype(np.float32), "t": rng.integers(0, 1000, batch),
            "ctx": rng.standard_normal((batch, 77, c.cross_attention_dim)).astype(np.float32)}


def write_weights(variant: str, path: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from diffbody_jax.config import load_config

    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(load_config(f"unet:variant={variant}").model.diffusers.to_dict())
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return {"params_m": round(sum(p.numel() for p in ref.parameters()) / 1e6, 1)}


def torch_side(variant: str, weights: str, batch: int, size: int, warmup: int, repeats: int) -> dict:
    import torch
    from common import median_time
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from diffbody_jax.config import load_config

    torch.set_num_threads(os.cpu_count())
    ref = UNet2DConditionModel.from_config(load_config(f"unet:variant={variant}").model.diffusers.to_dict())
    ref.load_state_dict(load_file(weights))
    ref.train()
    x = {k: torch.from_numpy(v) for k, v in _inputs(variant, batch, size).items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=1e-2)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ref(x["z"], x["t"], x["ctx"]).sample, x["eps"])
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    return {"seconds": median_time(step, max(warmup - 1, 0), repeats), "first_loss": first}


def ours_side(variant: str, weights: str, batch: int, size: int, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from common import median_time
    from safetensors.numpy import load_file

    from diffbody_jax.config import load_config
    from diffbody_jax.interop.mapping import torch_to_flax
    from diffbody_jax.interop.unet import unet_table
    from diffbody_jax.models.unet import build_unet
    from diffbody_jax.training.state import create_train_state
    from diffbody_jax.training.step import make_train_step

    ours = build_unet(load_config(f"unet:variant={variant}").model)
    host = torch_to_flax(load_file(weights), unet_table(ours.config), ours.param_shapes(), weights)
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), host)  # owned by XLA, so the host copy can go
    del host
    gc.collect()
    x = _inputs(variant, batch, size)
    data = {"z": jnp.asarray(x["z"].transpose(0, 2, 3, 1)), "eps": jnp.asarray(x["eps"].transpose(0, 2, 3, 1)),
            "t": jnp.asarray(x["t"]), "ctx": jnp.asarray(x["ctx"])}
    tx = optax.adamw(LR, weight_decay=1e-2)

    def loss_fn(variables, b, key):
        del key
        return jnp.mean((ours.apply(variables, b["z"], b["t"], b["ctx"]) - b["eps"]) ** 2), {}

    jitted = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    state = [create_train_state(params, {}, {}, tx, jax.random.PRNGKey(0), ema=False)]
    del params

    compiled = jitted.lower(state[0], data).compile()
    memory = compiled.memory_analysis()

    def step():
        state[0], metrics = compiled(state[0], data)
        return float(metrics["loss"])

    first = step()
    return {"seconds": median_time(step, max(warmup - 1, 0), repeats), "first_loss": first,
            "xla_temporaries_gb": memory.temp_size_in_bytes / 2**30}  # GiB


def child(args) -> None:
    sys.path.insert(0, str(REPO))
    if args.child == "weights":
        out = write_weights(args.variant, args.weights)
    else:
        side = torch_side if args.child == "torch" else ours_side
        out = side(args.variant, args.weights, args.batch, args.size, args.warmup, args.repeats)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def run_child(what: str, variant: str, weights: str, args, batch: int = 0, size: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--variant", variant, "--weights", weights,
           "--batch", str(batch), "--size", str(size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
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
    p.add_argument("--rows", default=ROWS, help="variant:BATCHxSIDE,... (SIDE: the latents' height and width)")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing, the first (compiling) included")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the rows here (JSON lines)")
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
    from common import load_report

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}; UNet train step, fp32, median of {args.repeats}")
    load_report("before")
    print("| variant | params | batch x latent | ours s | torch s | ratio | first loss ours / torch | "
          "peak RSS GB ours / torch | XLA temporaries GiB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for row in filter(None, args.rows.split(",")):
        variant, shape = row.split(":")
        batch, size = (int(v) for v in shape.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / "unet.safetensors")
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
