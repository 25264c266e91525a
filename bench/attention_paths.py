"""Attention at the UNets' shapes: the einsum form, what `einsum_attention` runs on XLA:CPU, and torch's SDPA.

    python bench/attention_paths.py              # ~1 minute on 2 cores

For each (batch, queries, keys, heads, head dim): the einsum form (q.k and p.v as "btnd,bsnd->bnts" einsums, what
other backends run), `models.attention.einsum_attention` on this machine (head-major matmuls; the key-blocked online
softmax from CPU_BLOCKED_MIN_KEYS keys), and torch.nn.functional.scaled_dot_product_attention, fp32, median of
--repeats calls; ratios are torch / ours. CPU_KEY_BLOCK and CPU_BLOCKED_MIN_KEYS in models/layers.py come from here.
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

from diffbody_jax.models.attention import einsum_attention  # noqa: E402

SHAPES = [  # (batch, queries, keys, heads, head dim): self- and cross-attention of mid-sd21 and sd21-base
    (1, 4096, 4096, 2, 64), (1, 4096, 4096, 5, 64), (2, 1024, 1024, 5, 64), (1, 1024, 1024, 10, 64),
    (2, 256, 256, 10, 64), (1, 64, 64, 20, 64), (1, 4096, 77, 5, 64), (2, 1024, 77, 10, 64),
]


def einsum_form(q, k, v):
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    load_report("before")
    print("| batch, queries, keys, heads, dim | einsum form (ms) | ours (ms) | torch SDPA (ms) | torch / ours | "
          "max abs diff |")
    print("|---|---|---|---|---|---|")
    einsum_jit, ours_jit = jax.jit(einsum_form), jax.jit(einsum_attention)
    rng = np.random.default_rng(0)
    for b, t, s, n, d in SHAPES:
        q = rng.standard_normal((b, t, n, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for _ in range(2))
        qj, kj, vj = map(jnp.asarray, (q, k, v))
        diff = float(jnp.abs(ours_jit(qj, kj, vj) - einsum_jit(qj, kj, vj)).max())
        t_einsum = median_time(lambda: einsum_jit(qj, kj, vj).block_until_ready(), 1, args.repeats)  # noqa: B023
        t_ours = median_time(lambda: ours_jit(qj, kj, vj).block_until_ready(), 1, args.repeats)  # noqa: B023
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        with torch.no_grad():
            t_torch = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),  # noqa: B023
                                  1, args.repeats)
        print(f"| {b}, {t}, {s}, {n}, {d} | {t_einsum * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_torch * 1e3:.2f} | "
              f"{t_torch / t_ours:.2f} | {diff:.1e} |", flush=True)
    load_report("after")


if __name__ == "__main__":
    main()
