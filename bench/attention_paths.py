"""Attention at the UNets' shapes: the einsum form, what `einsum_attention` runs on XLA:CPU, and torch's SDPA.

    python bench/attention_paths.py              # ~1 minute on 2 cores
    python bench/attention_paths.py --backward   # forward + backward (a training step's attention), ~3 minutes
    python bench/attention_paths.py --backward --backward-blocks 64,128,256,512

For each (batch, queries, keys, heads, head dim): the einsum form (q.k and p.v as "btnd,bsnd->bnts" einsums, what
other backends run), `models.attention.einsum_attention` on this machine (head-major matmuls; the key-blocked online
softmax from CPU_BLOCKED_MIN_KEYS keys), and torch.nn.functional.scaled_dot_product_attention, fp32, median of
--repeats calls; ratios are torch / ours. CPU_KEY_BLOCK and CPU_BLOCKED_MIN_KEYS in models/attention.py come from
here. --backward times the gradient of sum(out * w) with respect to q, k and v instead (autodiff of the einsum form,
our key-blocked attention's flash backward, torch's SDPA backward); --backward-blocks adds ours at each key block
size of the backward pass (CPU_BACKWARD_KEY_BLOCK comes from that).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import load_report, median_time  # noqa: E402

from diffbody_jax.models import attention  # noqa: E402
from diffbody_jax.models.attention import einsum_attention  # noqa: E402

SHAPES = [  # (batch, queries, keys, heads, head dim): self- and cross-attention of tiny-sd21 (the zoo's training
    # batch), mid-sd21 and sd21-base
    (4, 1024, 1024, 2, 16), (2, 1024, 1024, 8, 64), (1, 4096, 4096, 2, 64), (1, 4096, 4096, 5, 64),
    (2, 1024, 1024, 5, 64), (1, 1024, 1024, 10, 64),
    (2, 256, 256, 10, 64), (1, 64, 64, 20, 64), (1, 4096, 77, 5, 64), (2, 1024, 77, 10, 64),
]


def einsum_form(q, k, v):
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)


def _with_gradient(fn, w):
    """q, k, v -> (dq, dk, dv) of sum(fn(q, k, v) * w)."""
    return jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))


def _ours_with_backward_block(block: int, w):
    """Our gradient traced with the backward pass blocking keys by `block` (a fresh trace per block)."""
    def run(q, k, v):
        saved = attention.CPU_BACKWARD_KEY_BLOCK
        attention.CPU_BACKWARD_KEY_BLOCK = block
        try:
            return _with_gradient(einsum_attention, w)(q, k, v)
        finally:
            attention.CPU_BACKWARD_KEY_BLOCK = saved
    return jax.jit(run)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backward", action="store_true", help="time forward + backward (the gradient of q, k, v)")
    p.add_argument("--backward-blocks", default="", help="with --backward: also ours at these backward key blocks")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    load_report("before")
    blocks = [int(b) for b in args.backward_blocks.split(",") if b] if args.backward else []
    what = "forward + backward" if args.backward else "forward"
    print(f"# {what}, fp32, median of {args.repeats}")
    print("| batch, queries, keys, heads, dim | einsum form (ms) | ours (ms) | torch SDPA (ms) | torch / ours | "
          "max abs diff |" + "".join(f" ours, backward block {b} (ms) |" for b in blocks))
    print("|---|---|---|---|---|---|" + "---|" * len(blocks))
    rng = np.random.default_rng(0)
    for b, t, s, n, d in SHAPES:
        q = rng.standard_normal((b, t, n, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for _ in range(2))
        w = rng.standard_normal(q.shape).astype(np.float32)
        qj, kj, vj, wj = map(jnp.asarray, (q, k, v, w))
        if args.backward:
            einsum_jit, ours_jit = (jax.jit(_with_gradient(f, wj)) for f in (einsum_form, einsum_attention))
        else:
            einsum_jit, ours_jit = jax.jit(einsum_form), jax.jit(einsum_attention)
        diff = max(float(jnp.abs(a - e).max()) for a, e in zip(jax.tree.leaves(ours_jit(qj, kj, vj)),
                                                                jax.tree.leaves(einsum_jit(qj, kj, vj)), strict=True))
        t_einsum = median_time(lambda: jax.block_until_ready(einsum_jit(qj, kj, vj)), 1, args.repeats)  # noqa: B023
        t_ours = median_time(lambda: jax.block_until_ready(ours_jit(qj, kj, vj)), 1, args.repeats)  # noqa: B023
        per_block = []
        for blk in blocks:
            f = _ours_with_backward_block(blk, wj)
            per_block.append(median_time(lambda: jax.block_until_ready(f(qj, kj, vj)), 1, args.repeats))  # noqa: B023
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        wt = torch.from_numpy(w).transpose(1, 2).contiguous()
        if args.backward:
            for x in (qt, kt, vt):
                x.requires_grad_(True)

            def torch_run():
                for x in (qt, kt, vt):  # noqa: B023
                    x.grad = None
                (torch.nn.functional.scaled_dot_product_attention(qt, kt, vt) * wt).sum().backward()  # noqa: B023

            t_torch = median_time(torch_run, 1, args.repeats)
        else:
            with torch.no_grad():
                t_torch = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),  # noqa: B023
                                      1, args.repeats)
        print(f"| {b}, {t}, {s}, {n}, {d} | {t_einsum * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_torch * 1e3:.2f} | "
              f"{t_torch / t_ours:.2f} | {diff:.1e} |" + "".join(f" {x * 1e3:.2f} |" for x in per_block), flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
