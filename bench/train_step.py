"""Training cost: our jitted train step against a PyTorch/diffusers step, and the SDXL stage-2 state under FSDP.

  python bench/train_step.py                      # tiny-sd21 and mid-sd21 steps, then the stage-2 memory table
  python bench/train_step.py --variants tiny-sd21 --skip-memory

Part 1, speed: one step = UNet forward on noised latents, MSE against the noise, backward, AdamW update, same
weights and inputs on both sides (fp32, CPU, every core). Each time is the median of --repeats steps after
--warmup steps; ratio = torch s / ours s, so above 1.0 means our step is faster.

Part 2, memory: the per-device bytes of DiffBody v2's stage-2 train state (frozen SDXL UNet, trained prior-fusion
ControlNet with Adam's two moments and an EMA, fp32) under our FSDP rule on 8 and 64 devices. Computed from the
state's `jax.eval_shape` and the PartitionSpecs the sharding rules give it on an abstract mesh (no memory, no
devices): activations, XLA's temporaries and the gathered layer in flight come on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import load_report, median_time, unet_pair  # noqa: E402

from diffbody_jax.config import load_config  # noqa: E402

LR = 1e-5


def bench_speed(variant: str, batch: int, size: int, warmup: int, repeats: int) -> dict:
    import torch

    from diffbody_jax.training.state import create_train_state
    from diffbody_jax.training.step import make_train_step

    ours, ref, params = unet_pair(variant)
    ref.train()
    c = ours.config
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, c.in_channels, size, size)).astype(np.float32)
    eps = rng.standard_normal(z.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, 77, c.cross_attention_dim)).astype(np.float32)

    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=1e-2)
    z_t, eps_t, t_t, ctx_t = (torch.from_numpy(a) for a in (z, eps, t, ctx))

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ref(z_t, t_t, ctx_t).sample, eps_t)
        loss.backward()
        opt.step()
        return loss.item()

    tx = optax.adamw(LR, weight_decay=1e-2)

    def loss_fn(variables, b, key):
        del key
        pred = ours.apply(variables, b["z"], b["t"], b["ctx"])
        return jnp.mean((pred - b["eps"]) ** 2), {}

    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    state = [create_train_state(params, {}, {}, tx, jax.random.PRNGKey(0), ema=False)]
    data = {"z": jnp.asarray(z.transpose(0, 2, 3, 1)), "eps": jnp.asarray(eps.transpose(0, 2, 3, 1)),
            "t": jnp.asarray(t), "ctx": jnp.asarray(ctx)}

    def jax_step():
        state[0], metrics = step(state[0], data)
        return float(metrics["loss"])

    ours_s = median_time(jax_step, warmup, repeats)
    torch_s = median_time(torch_step, warmup, repeats)
    return dict(variant=variant, params_m=round(sum(p.numel() for p in ref.parameters()) / 1e6, 1), batch=batch,
                latent=size, ours_examples_per_s=round(batch / ours_s, 2),
                torch_examples_per_s=round(batch / torch_s, 2), ratio=round(torch_s / ours_s, 3))


def stage2_state_bytes(devices: int, fsdp_min_size: int = 2**18) -> dict:
    """Per-device bytes of each part of the stage-2 state with fsdp = `devices`."""
    from jax.sharding import AbstractMesh

    from diffbody_jax.models.registry import build_model
    from diffbody_jax.parallel.sharding import ShardingRules, param_partition_specs
    from diffbody_jax.training.phases import get_phase
    from diffbody_jax.training.trainable import partition

    config = load_config("stage2_controlnet:variant=paper")
    module = build_model(config.model)
    boxed = module.abstract_variables()
    mesh = AbstractMesh((1, devices, 1), ("data", "fsdp", "tensor"))
    specs = param_partition_specs(boxed["params"], mesh, ShardingRules(fsdp_min_size=fsdp_min_size))
    shapes = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, boxed["params"],
                          is_leaf=lambda b: hasattr(b, "names"))

    def per_device(tree, spec_tree):
        total = 0
        for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(spec_tree, is_leaf=lambda s: isinstance(
                s, jax.sharding.PartitionSpec)), strict=True):
            split = math.prod(mesh.shape[a] for axes in spec if axes for a in ((axes,) if isinstance(axes, str)
                                                                              else axes))
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize / split
        return total

    subset = get_phase(config.phase).trainable(config)
    trainable, frozen = partition(shapes, subset)
    trainable_specs, frozen_specs = partition(specs, subset)
    t = per_device(trainable, trainable_specs)
    f = per_device(frozen, frozen_specs)
    return dict(devices=devices, frozen_gb=f / 1e9, trainable_gb=t / 1e9, adam_gb=2 * t / 1e9, ema_gb=t / 1e9,
                total_gb=(f + 4 * t) / 1e9,
                frozen_params_b=sum(math.prod(x.shape) for x in jax.tree.leaves(frozen)) / 1e9,
                trainable_params_b=sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="tiny-sd21,mid-sd21")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; expected ~5 min")
    load_report("before")
    print(f"{'variant':<12} {'params':>8} {'batch':>5} {'latent':>6} {'ours ex/s':>10} {'torch ex/s':>10} {'ratio':>6}")
    for variant in filter(None, args.variants.split(",")):
        r = bench_speed(variant, args.batch, args.size, args.warmup, args.repeats)
        print(f"{r['variant']:<12} {r['params_m']:>7}M {r['batch']:>5} {r['latent']:>6} "
              f"{r['ours_examples_per_s']:>10} {r['torch_examples_per_s']:>10} {r['ratio']:>6}")
        print("json:", json.dumps(r))
    load_report("after")
    if args.skip_memory:
        return
    print("\n# SDXL stage-2 train state per device (fp32; frozen UNet + ControlNet, Adam, EMA), FSDP")
    print(f"{'devices':>7} {'frozen GB':>9} {'trained GB':>10} {'Adam GB':>8} {'EMA GB':>7} {'total GB':>8} "
          f"{'of A100 80GB':>12} {'of v5e 16GB':>11}")
    for n in (8, 64):
        m = stage2_state_bytes(n)
        print(f"{n:>7} {m['frozen_gb']:>9.2f} {m['trainable_gb']:>10.2f} {m['adam_gb']:>8.2f} {m['ema_gb']:>7.2f} "
              f"{m['total_gb']:>8.2f} {m['total_gb'] / 80:>12.3f} {m['total_gb'] / 16:>11.3f}")
        print("json:", json.dumps(m))


if __name__ == "__main__":
    main()
