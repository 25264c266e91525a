"""Where a UNet forward or training step spends its time, by op family, ours (XLA) against torch, same weights and
inputs.

    python bench/profile_ops.py                                   # sd21-base and mid-sd21, 4 latent sizes: ~6 min
    python bench/profile_ops.py --variants mid-sd21 --sizes 1x16 --repeats 3
    python bench/profile_ops.py --step train --variants tiny-sd21,mid-sd21 --sizes 4x32,2x32

--step train profiles bench/common.py's training step (forward, MSE, backward, AdamW; the same first loss on both
sides) and adds two columns: optimizer (the AdamW update; ours: the `optimizer_update` scope of make_train_step)
and "of which backward" (ours: ops whose op_name is a transposed jvp, what XLA derived for the gradient; torch: ops
run under the autograd engine's backward nodes).

For each variant and latent size (batch x side): the median forward time of each side, then the time per op family
summed over --repeats profiled forwards and divided by --repeats:

- ours: `jax.profiler.trace` (perfetto JSON) gives one event per executed XLA thunk (fusion, dot, convolution, ...);
  each is classified from the compiled HLO: its opcode, the ops inside a fusion, and the op_name metadata (the Flax
  module path, e.g. .../attn1/...). Thunks run on a thread pool, so the family sums can exceed the wall time.
- torch: `torch.profiler` self CPU time per aten op, classified by op name.

Families: conv (convolutions, and our im2col matmuls inside Conv2D), matmul (linear layers, projections), attention
(the q.k / softmax / .v of attention, not its projections), norms (GroupNorm, LayerNorm, including the elementwise
work XLA fuses into them), elementwise (activations, residual adds, the rest of the arithmetic), copies (transposes,
copies, concatenations, pads, slices). The classification is a heuristic (a fusion of a norm and its SiLU counts
as norms); docs/performance.md has the tables.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (  # noqa: E402
    cpu_description,
    jax_unet_train_step,
    load_report,
    median_time,
    torch_unet_train_step,
    unet_pair,
)

FAMILIES = ("conv", "matmul", "attention", "norms", "elementwise", "copies", "optimizer")
MOVES = ("transpose", "copy", "concatenate", "pad", "slice", "dynamic-slice", "dynamic-update-slice", "bitcast",
         "broadcast", "reshape", "parameter", "constant", "tuple", "get-tuple-element", "iota")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


# ------------------------------------------------------------------------------------------- XLA side
def _computations(hlo: str) -> dict[str, str]:
    """name -> body text of every computation in an HLO module's text."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line.startswith("}") and name is not None:
            out[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return out


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (opcode, called computation or "", op_name metadata)."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = \S+(?:\{[^}]*\})? ([\w\-]+)\(", line)
        if not m:
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if not m:
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        out[m.group(1)] = (m.group(2), calls.group(1) if calls else "", op_name.group(1) if op_name else "")
    return out


def _ops_in(body: str) -> set[str]:
    return set(re.findall(r"= \S+(?:\{[^}]*\})? ([\w\-]+)\(", body))


def classify_xla(opcode: str, called_ops: set[str], op_name: str) -> str:
    """A thunk's family from its opcode, the ops of the computation it calls, and its Flax module path."""
    segments = op_name.lower().split("/")
    ops = called_ops | {opcode}
    if "optimizer_update" in segments:
        return "optimizer"
    is_norm = any(s.startswith("norm") or s == "conv_norm_out" for s in segments)
    is_conv_module = any(s.startswith("conv") and s != "conv_norm_out" for s in segments)
    in_attention = any(s.startswith("attn") for s in segments) and not any(s in ATTENTION_PROJECTIONS
                                                                         for s in segments)
    if "convolution" in ops:
        return "conv"
    if "dot" in ops:
        return "conv" if is_conv_module else "attention" if in_attention else "matmul"
    if is_norm:
        return "norms"
    if in_attention and ops & {"exponential", "reduce", "divide"}:
        return "attention"
    if ops <= set(MOVES) | {"fusion"}:
        return "copies"
    return "elementwise"


def xla_families(compiled_text: str, trace_dir: str, repeats: int) -> dict[str, float]:
    """ms per call per family from the perfetto trace of `repeats` calls, and "backward": the part of the total
    whose op_name is a transposed (jvp) op, what XLA derived for the gradient."""
    computations = _computations(compiled_text)
    instructions = _instructions(compiled_text)
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))["traceEvents"]
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in instructions:
            continue
        opcode, called, op_name = instructions[e["name"]]
        family = classify_xla(opcode, _ops_in(computations.get(called, "")), op_name)
        totals[family] += e.get("dur", 0.0) / 1e3
        if "transpose(" in op_name:
            totals["backward"] += e.get("dur", 0.0) / 1e3
    return {f: totals[f] / repeats for f in (*FAMILIES, "backward")}


# ----------------------------------------------------------------------------------------- torch side
TORCH_FAMILIES = [
    ("optimizer", ("_foreach", "Optimizer.", "adamw")),
    ("elementwise", ("autograd::",)),  # the autograd engine's own time per node (its children are counted apart)
    ("conv", ("conv", "mkldnn_convolution")),
    ("attention", ("scaled_dot_product", "flash_attention", "_softmax", "softmax", "baddbmm", "bmm")),
    ("matmul", ("addmm", "aten::mm", "matmul", "linear")),
    ("norms", ("group_norm", "layer_norm", "batch_norm")),
    ("copies", ("copy_", "contiguous", "clone", "cat", "permute", "transpose", "reshape", "view", "pad", "slice",
                "empty", "to", "expand", "chunk", "split", "as_strided", "unsqueeze", "select")),
]


def classify_torch(name: str) -> str:
    for family, keys in TORCH_FAMILIES:
        if any(k in name for k in keys):
            return family
    return "elementwise"


def torch_families(run, repeats: int) -> dict[str, float]:
    """ms per call per family (self CPU time) over `repeats` calls of `run`, and "backward": the self time of
    every op run under the autograd engine's backward nodes."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    totals = collections.Counter()
    for row in prof.key_averages():
        totals[classify_torch(row.key)] += row.self_cpu_time_total / 1e3
    for e in prof.events():
        parent = e
        while parent is not None and not parent.name.startswith("autograd::engine::evaluate_function"):
            parent = parent.cpu_parent
        if parent is not None:
            totals["backward"] += e.self_cpu_time_total / 1e3
    return {f: totals[f] / repeats for f in (*FAMILIES, "backward")}


# -------------------------------------------------------------------------------------------- driver
def profile(variant: str, batch: int, side: int, repeats: int, step: str = "forward") -> dict:
    """One row: both sides' median time of a forward (or, with step="train", a training step: forward, MSE,
    backward, AdamW) and their time per op family."""
    import torch

    ours, ref, params = unet_pair(variant)
    c = ours.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c.in_channels, side, side)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    ctx = rng.standard_normal((batch, 77, c.cross_attention_dim)).astype(np.float32)
    x_t, t_t, ctx_t = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
    if step == "train":
        eps = rng.standard_normal(x.shape).astype(np.float32)
        torch_run = torch_unet_train_step(ref, x_t, t_t, ctx_t, torch.from_numpy(eps))
        jax_run, compiled = jax_unet_train_step(ours, params, x.transpose(0, 2, 3, 1), t, ctx,
                                                eps.transpose(0, 2, 3, 1))
        ours_loss, torch_loss = jax_run(), torch_run()  # the same first step on both sides
        err = abs(ours_loss - torch_loss)
    else:
        def torch_run():
            with torch.inference_mode():
                return ref(x_t, t_t, ctx_t).sample

        forward = jax.jit(lambda p, a, b, k: ours.apply({"params": p}, a, b, k))
        args = (params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
        compiled = forward.lower(*args).compile()
        out = np.asarray(forward(*args))
        err = float(np.abs(out.transpose(0, 3, 1, 2) - torch_run().numpy()).max())

        def jax_run():
            return forward(*args).block_until_ready()

    ours_ms = median_time(jax_run, 2, repeats) * 1e3
    torch_ms = median_time(torch_run, 2, repeats) * 1e3
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(repeats):
                jax_run()
        ours_f = xla_families(compiled.as_text(), trace_dir, repeats)
    torch_f = torch_families(torch_run, repeats)
    return dict(variant=variant, latent=f"{batch}x{side}x{side}", step=step, ours_ms=ours_ms, torch_ms=torch_ms,
                ratio=torch_ms / ours_ms, max_abs_err=err, ours=ours_f, torch=torch_f)


def markdown(rows: list[dict]) -> str:
    lines = ["| UNet, latent | side | total (ms) | " + " | ".join((*FAMILIES, "of which backward")) + " |",
             "|---|---|---|" + "---|" * (len(FAMILIES) + 1)]
    for r in rows:
        for side in ("ours", "torch"):
            total = r[f"{side}_ms"]
            cells = " | ".join(f"{r[side][f]:.1f}" for f in (*FAMILIES, "backward"))
            label = f"{r['variant']}, {r['latent']}" if side == "ours" else f"(ratio {r['ratio']:.2f})"
            lines.append(f"| {label} | {side} | {total:.1f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="mid-sd21,sd21-base")
    p.add_argument("--sizes", default="1x8,1x16,2x32,1x64", help="batch x latent side, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step", choices=("forward", "train"), default="forward",
                   help="what is timed and profiled: a forward, or a training step (forward, MSE, backward, AdamW)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# machine: {cpu_description()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}; expected run time ~6 min for the defaults")
    load_report("before")
    rows = []
    for variant in args.variants.split(","):
        for size in args.sizes.split(","):
            batch, side = map(int, size.split("x"))
            rows.append(profile(variant, batch, side, args.repeats, args.step))
            r = rows[-1]
            what = "first loss" if r["step"] == "train" else "max abs"
            print(f"# {variant} {r['latent']}: ours {r['ours_ms']:.1f} ms, torch {r['torch_ms']:.1f} ms, ratio "
                  f"{r['ratio']:.2f}, {what} diff {r['max_abs_err']:.1e}", flush=True)
    load_report("after")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
