"""3x3 convolutions at the UNets' sizes: XLA's convolution, the same conv as im2col + one matmul, as Winograd's
F(2x2, 3x3), and torch.

    python bench/conv_paths.py                 # ~2 minutes on 2 cores
    python bench/conv_paths.py --repeats 20
    python bench/conv_paths.py --backward      # the kernel and input gradients instead, ~3 minutes

For each (batch, H, W, C_in -> C_out) it prints the median time of lax.conv_general_dilated, of `_im2col_conv` and
`_winograd_conv` (models/layers.py; "-" where `winograd_applies` is false) and of torch.nn.functional.conv2d on the
same data, fp32, and the max abs difference of each JAX path to lax.conv. The sizes are the SD2.1 UNet's levels
(320/640/1280 channels, the decoder's concatenated inputs too), mid-sd21's (128-512) and tiny-sd21's (32-64) at the
spatial sizes of 8x8 to 64x64 latents; IM2COL_MAX_POSITIONS and the WINOGRAD_MIN_* thresholds in models/layers.py
are set from where each path stops winning here. --backward times the gradients of sum(conv(x, k) * w) instead:
the kernel gradient XLA derives from lax.conv (another convolution) against `_cpu_conv`'s (one matmul per kernel
tap), and the input gradient XLA derives (a transposed convolution) against Winograd's on the flipped kernel, each
beside torch's convolution_backward for the same output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import load_report, median_time  # noqa: E402

from diffbody_jax.models.layers import _cpu_conv, _im2col_conv, _winograd_conv, winograd_applies  # noqa: E402

SHAPES = [  # (batch, H, W, C_in, C_out)
    (1, 1, 1, 1280, 1280), (1, 2, 2, 512, 512), (2, 2, 2, 512, 512), (1, 2, 2, 1280, 1280), (1, 4, 4, 512, 512),
    (2, 4, 4, 1280, 1280), (1, 8, 8, 512, 512), (2, 8, 8, 640, 640), (1, 16, 16, 256, 256), (2, 16, 16, 320, 320),
    (2, 16, 16, 640, 640), (1, 16, 16, 1280, 1280), (4, 32, 32, 32, 32), (4, 32, 32, 32, 64), (4, 16, 16, 64, 64),
    (1, 32, 32, 128, 128), (2, 32, 32, 320, 320), (1, 32, 32, 1280, 640), (1, 64, 64, 320, 320),
    (1, 64, 64, 640, 320),
]
PAD = ((1, 1), (1, 1))


def _winograd_or_none(b, h, w, cin, cout):
    return jax.jit(lambda x, k: _winograd_conv(x, k, None)) if winograd_applies(
        (b, h, w, cin), (3, 3, cin, cout), (1, 1), PAD, jnp.float32) else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backward", action="store_true", help="time the kernel gradient instead of the forward")
    args = p.parse_args(argv)
    if args.backward:
        return backward(args.repeats)
    import torch

    load_report("before")
    rng = np.random.default_rng(0)
    pad = ((1, 1), (1, 1))
    xla = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO",
                                                                                                   "NHWC")))
    im2col = jax.jit(lambda x, k: _im2col_conv(x, k, (1, 1), pad, None))
    print("| batch x H x W | C_in -> C_out | lax.conv (ms) | im2col (ms) | Winograd (ms) | torch (ms) | "
          "torch / lax.conv | torch / im2col | torch / Winograd | max abs diff im2col, Winograd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, h, w, cin, cout in SHAPES:
        x = rng.standard_normal((b, h, w, cin), np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        xj, kj = jnp.asarray(x), jnp.asarray(k)
        paths = {"xla": xla, "im2col": im2col, "winograd": _winograd_or_none(b, h, w, cin, cout)}
        ref = xla(xj, kj)
        diffs = {n: float(jnp.abs(f(xj, kj) - ref).max()) for n, f in paths.items() if f is not None}
        times = {n: median_time(lambda f=f: f(xj, kj).block_until_ready(), 2, args.repeats)  # noqa: B023
                 for n, f in paths.items() if f is not None}
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
        with torch.no_grad():
            t_torch = median_time(lambda a=xt, b=kt: torch.nn.functional.conv2d(a, b, padding=1), 2,
                                  args.repeats)
        ms = " | ".join(f"{times[n] * 1e3:.2f}" if n in times else "-" for n in paths)
        ratios = " | ".join(f"{t_torch / times[n]:.2f}" if n in times else "-" for n in paths)
        diff = ", ".join(f"{diffs[n]:.1e}" if n in diffs else "-" for n in ("im2col", "winograd"))
        print(f"| {b}x{h}x{w} | {cin} -> {cout} | {ms} | {t_torch * 1e3:.2f} | {ratios} | {diff} |", flush=True)
    load_report("after")


def backward(repeats: int) -> None:
    import torch

    load_report("before")
    rng = np.random.default_rng(0)
    pad = ((1, 1), (1, 1))

    def kernel_grad(conv):
        return jax.jit(jax.grad(lambda x, k, w: (conv(x, k) * w).sum(), argnums=1))

    xla = kernel_grad(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), pad,
                                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    ours = kernel_grad(lambda x, k: _cpu_conv(x, k, (1, 1), pad, None, False))

    def input_grad(conv):
        return jax.jit(jax.grad(lambda x, k, w: (conv(x, k) * w).sum(), argnums=0))

    xla_dx = input_grad(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), pad,
                                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
    winograd_dx = input_grad(lambda x, k: _cpu_conv(x, k, (1, 1), pad, None, True))
    print("| batch x H x W | C_in -> C_out | XLA's kernel gradient (ms) | one matmul per tap (ms) | torch (ms) | "
          "XLA's / ours | torch / ours | max abs diff | XLA's input gradient (ms) | Winograd's (ms) | torch (ms) | "
          "XLA's / Winograd's | torch / Winograd's | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b, h, w, cin, cout in SHAPES:
        if h * w <= 64:  # the im2col path's sizes: its gradient is a matmul already
            continue
        x = rng.standard_normal((b, h, w, cin), np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        dy = rng.standard_normal((b, h, w, cout), np.float32)
        xj, kj, dyj = map(jnp.asarray, (x, k, dy))
        diff = float(jnp.abs(xla(xj, kj, dyj) - ours(xj, kj, dyj)).max())
        t_xla = median_time(lambda a=xj, c=kj, d=dyj: xla(a, c, d).block_until_ready(), 2, repeats)
        t_ours = median_time(lambda a=xj, c=kj, d=dyj: ours(a, c, d).block_until_ready(), 2, repeats)
        xt, kt, dyt = (torch.from_numpy(a).permute(*p).contiguous() for a, p in
                       ((x, (0, 3, 1, 2)), (k, (3, 2, 0, 1)), (dy, (0, 3, 1, 2))))
        t_torch = median_time(lambda: torch.ops.aten.convolution_backward(  # noqa: B023
            dyt, xt, kt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]), 2, repeats)  # noqa: B023
        row = (f"| {b}x{h}x{w} | {cin} -> {cout} | {t_xla * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_torch * 1e3:.2f} | "
               f"{t_xla / t_ours:.2f} | {t_torch / t_ours:.2f} | {diff:.1e} |")
        if winograd_applies(x.shape, k.shape, (1, 1), pad, jnp.float32):
            dx_diff = float(jnp.abs(xla_dx(xj, kj, dyj) - winograd_dx(xj, kj, dyj)).max())
            t_xla_dx = median_time(lambda a=xj, c=kj, d=dyj: xla_dx(a, c, d).block_until_ready(), 2, repeats)
            t_win_dx = median_time(lambda a=xj, c=kj, d=dyj: winograd_dx(a, c, d).block_until_ready(), 2, repeats)
            t_torch_dx = median_time(lambda: torch.ops.aten.convolution_backward(  # noqa: B023
                dyt, xt, kt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]), 2,  # noqa: B023
                repeats)
            row += (f" {t_xla_dx * 1e3:.2f} | {t_win_dx * 1e3:.2f} | {t_torch_dx * 1e3:.2f} | "
                    f"{t_xla_dx / t_win_dx:.2f} | {t_torch_dx / t_win_dx:.2f} | {dx_diff:.1e} |")
        else:
            row += " - | - | - | - | - | - |"
        print(row, flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
