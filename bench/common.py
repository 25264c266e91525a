"""What the benchmark scripts share: the timing loop and moving a PyTorch model's weights into ours."""

from __future__ import annotations

import os
import statistics
import time

import jax

VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_description() -> str:
    """The CPU model and its vector extensions (from /proc/cpuinfo where there is one): the ratios of these benches
    move with them (AVX-512 and AMX change both sides' kernels)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if model and flags:
                break
    except OSError:
        pass
    vector = [f for f in VECTOR_FLAGS if f in flags]
    return f"{model} ({' '.join(vector) or 'vector extensions unknown'})"


def child_environment(hugepages: bool) -> tuple[dict[str, str], str]:
    """The environment for a bench's child processes, and a note for its header. hugepages: the one `diffbody`
    runs in (diffbody_jax/host_memory.py: glibc's malloc on transparent huge pages), given to both sides, so the
    comparison is the one a user of either sees with the same setting; False: the variable is removed."""
    from diffbody_jax.host_memory import TUNABLE, hugepage_environment

    environ = dict(os.environ)
    if not hugepages:
        environ.pop("GLIBC_TUNABLES", None)
        return environ, "malloc: default"
    environ = hugepage_environment(environ) or environ
    on = TUNABLE in environ.get("GLIBC_TUNABLES", "")
    return environ, (f"malloc: GLIBC_TUNABLES={environ['GLIBC_TUNABLES']} (both sides)" if on
                     else "malloc: default (huge pages not available here)")


def load_report(when: str) -> None:
    """Print the 1-minute load average; warn above the core count. torch's OpenMP threads slow down far more than
    XLA's under load (a loaded run once inflated our ratio six-fold), so a ratio from a loaded machine misleads.
    The "after" figure includes the benchmark's own threads."""
    load = os.getloadavg()[0]
    cores = os.cpu_count()
    warn = f"  WARNING: above the {cores} cores: the ratios are not trustworthy" if load > cores else ""
    print(f"# load average {when}: {load:.2f}{warn}", flush=True)


def median_time(fn, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(a, b, repeats: int) -> tuple[float, float, float]:
    """(median a, median b, median of a / b - 1) over `repeats` alternating calls after one warm-up of each: a
    slow spell of the machine then hits both sides of a pair alike."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [x / y - 1 for x, y in zip(times_a, times_b, strict=True)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def flax_params(ref, ours, table, source: str):
    """A PyTorch module's weights as our params on the default device (layout moved by `table`)."""
    from diffbody_jax.interop.mapping import torch_to_flax
    from diffbody_jax.interop.torch_files import torch_to_numpy

    state = {k: torch_to_numpy(v) for k, v in ref.state_dict().items()}
    return jax.device_put(torch_to_flax(state, table, ours.param_shapes(), source))


def unet_pair(variant: str):
    """(ours, torch UNet in eval mode, our params holding its weights) for a configs/unet.py variant; torch's
    random init under seed 0 (diffusers' UNet2DConditionModel), converted by our interop table."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffbody_jax.config import load_config
    from diffbody_jax.interop.unet import unet_table
    from diffbody_jax.models.unet import build_unet

    model_cfg = load_config(f"unet:variant={variant}").model
    ours = build_unet(model_cfg)
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(model_cfg.diffusers.to_dict()).eval()
    return ours, ref, flax_params(ref, ours, unet_table(ours.config), variant)


# One training step on each side: a prediction from noised latents, MSE against the noise, backward, AdamW (fp32).
# bench/train_step.py times it, bench/profile_ops.py --step train profiles it.
TRAIN_LR, TRAIN_WEIGHT_DECAY = 1e-5, 1e-2


def torch_train_step(predict, trainable, eps):
    """`step() -> loss` (a float, the loss before the update): AdamW over the torch parameters `trainable`,
    `predict()` the model's output (NCHW) for the fixed inputs, `eps` its target."""
    import torch

    opt = torch.optim.AdamW(trainable, lr=TRAIN_LR, weight_decay=TRAIN_WEIGHT_DECAY)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(predict(), eps)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_unet_train_step(ref, z, t, ctx, eps):
    """The step of a whole torch UNet (train mode); inputs are NCHW torch tensors."""
    ref.train()
    return torch_train_step(lambda: ref(z, t, ctx).sample, ref.parameters(), eps)


def torch_controlnet_train_step(unet, controlnet, z, t, ctx, cond, eps):
    """The step of a torch ControlNet steering a frozen UNet (its residuals added, as diffusers' pipelines do)."""
    unet.eval().requires_grad_(False)
    controlnet.train()

    def predict():
        down, mid = controlnet(z, t, ctx, cond, return_dict=False)
        return unet(z, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    return torch_train_step(predict, controlnet.parameters(), eps)


def jax_train_step(predict, trainable, frozen, data):
    """(`step() -> loss`, the compiled program): the project's train step (`make_train_step`, its state donated)
    over `trainable` params with `frozen` ones held apart; `predict(params, batch)` is the model's output for the
    merged params and `data` (arrays, NHWC, with the target under "eps"). The params are moved into the state."""
    import jax.numpy as jnp
    import optax

    from diffbody_jax.training.state import create_train_state
    from diffbody_jax.training.step import make_train_step

    data = {k: jnp.asarray(v) for k, v in data.items()}
    tx = optax.adamw(TRAIN_LR, weight_decay=TRAIN_WEIGHT_DECAY)

    def loss_fn(variables, b, key):
        del key
        return jnp.mean((predict(variables["params"], b) - b["eps"]) ** 2), {}

    jitted = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    state = [create_train_state(trainable, frozen, {}, tx, jax.random.PRNGKey(0), ema=False)]
    compiled = jitted.lower(state[0], data).compile()

    def step():
        state[0], metrics = compiled(state[0], data)
        return float(metrics["loss"])

    return step, compiled


def jax_unet_train_step(ours, params, z, t, ctx, eps):
    """Our whole UNet's step; inputs NHWC."""
    return jax_train_step(lambda p, b: ours.apply({"params": p}, b["z"], b["t"], b["ctx"]), params, {},
                          {"z": z, "t": t, "ctx": ctx, "eps": eps})


def jax_controlnet_train_step(unet, controlnet, unet_params, controlnet_params, z, t, ctx, cond, eps):
    """Our ControlNet's step over a frozen UNet; inputs NHWC."""
    def predict(p, b):
        res = controlnet.apply({"params": p["controlnet"]}, b["z"], b["t"], b["ctx"], b["cond"])
        return unet.apply({"params": p["unet"]}, b["z"], b["t"], b["ctx"], down_residuals=res.down,
                          mid_residual=res.mid)

    return jax_train_step(predict, {"controlnet": controlnet_params}, {"unet": unet_params},
                          {"z": z, "t": t, "ctx": ctx, "cond": cond, "eps": eps})
