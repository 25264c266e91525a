"""What the benchmark scripts share: the timing loop and moving a PyTorch model's weights into ours."""

from __future__ import annotations

import os
import statistics
import time

import jax


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
