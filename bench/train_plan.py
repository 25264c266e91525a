"""Per-device memory, collectives and FSDP layout of each training phase's step, compiled for abstract state
(`training.plan.plan_train_step`): nothing is allocated.

    python bench/train_plan.py --devices 8 --variant tiny --set data.batch_size=8 --set mesh.fsdp_min_size=256
    python bench/train_plan.py --libtpu .cache/libtpu --target tpu:v5e:2x2           # v1 on 4 chips, the paper's 4
    python bench/train_plan.py --libtpu .cache/libtpu --target tpu:v5e:8x8 --phases stage2_controlnet

Each phase is compiled in a child process of its own (its peak RSS is the compile's), at its config's global batch
and its largest bucket (1024 x 512 for the papers), on a mesh (data, fsdp, tensor) = (1, all devices, 1) unless
--mesh says otherwise. A row: per device the trainable params, the frozen params, optimizer moments (+ EMA),
XLA's temporaries and the total; the gathered weights alive at once against the largest layer's full weights (the
FSDP layout holds when the first is at most twice the second, and every all-gather sits in a layer's named scope);
the collectives; the compile seconds and the child's peak RSS. --target tpu:... compiles for a TPU slice with
XLA:TPU (bench/README.md says how to get libtpu); on CPU (--devices N forced host devices) the figures estimate an
accelerator's with --attention chunked standing in for its kernel (`bounded` resolves to the key-blocked einsum on
CPU, whose backward keeps every logit), and XLA:CPU's scheduler issues every gather early (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from targets import REPO, add_target_args, target_devices_from

PHASES = ("v1_controlnet", "stage1_joint_unet", "stage1_controlnet", "stage2_controlnet", "colour_adapter")
# the largest of the papers' buckets (equal area: 512 x 1024 plans the same)
PAPER_SIZE = (1024, 512)


def plan_one(args) -> dict:
    devices = target_devices_from(args)
    from diffbody_jax.config import load_config
    from diffbody_jax.parallel.mesh import MeshConfig
    from diffbody_jax.training.plan import plan_train_step

    config = load_config(f"{args.phase}:variant={args.variant}", args.set)
    if args.attention:  # e.g. "chunked" on CPU: the bounded kernel a GPU or TPU would run, standing in for it
        for section in config.model.members.values() if "members" in config.model else [config.model]:
            if "attention_backend" in section:
                section.attention_backend = args.attention
    mesh = MeshConfig(*(int(x) for x in args.mesh.split(","))) if args.mesh else MeshConfig(data=1, fsdp=-1)
    size = PAPER_SIZE if args.variant == "paper" else tuple(config.data.buckets[0])
    plan = plan_train_step(config, height=size[0], width=size[1], mesh=mesh, devices=devices)
    out = {**plan.__dict__, "row": plan.row(), "layout_ok": plan.layout_ok, "total_gib": plan.total_gib,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--variant", default="paper")
    p.add_argument("--mesh", help="data,fsdp,tensor (one may be -1); default 1,-1,1: FSDP over every device")
    p.add_argument("--set", action="append", default=[], help="a config override, e.g. data.batch_size=8")
    p.add_argument("--attention", help="every member's attention backend (default: the config's, `bounded`); "
                   "`chunked` on --devices stands in for the flash or splash kernel of a GPU or TPU")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # a child's one phase
    p.add_argument("--json", help="also write the rows here (JSON lines)")
    add_target_args(p)
    args = p.parse_args()
    if args.phase:
        print("PLAN " + json.dumps(plan_one(args)), flush=True)
        return
    print("| phase | batch at size | mesh (data x fsdp x tensor) | settings | params | frozen | optimizer + EMA | "
          "temporaries | total | gathered at once / largest layer | collectives | compile s | peak RSS GB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for phase in args.phases.split(","):
        child = [sys.executable, __file__, "--phase", phase, "--variant", args.variant, "--target", args.target,
                 *(["--devices", str(args.devices)] if args.devices else []),
                 *(["--libtpu", args.libtpu] if args.libtpu else []), *(["--mesh", args.mesh] if args.mesh else []),
                 *(["--attention", args.attention] if args.attention else []),
                 *[x for s in args.set for x in ("--set", s)]]
        proc = subprocess.run(child, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PLAN ")]
        if proc.returncode or not lines:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            print(f"| {phase} | failed: {why} |", flush=True)
            continue
        plan = json.loads(lines[-1][5:])
        layout = " (gathered early)" if plan["layout_ok"] is False else ""
        print(f"{plan['row']} {plan['peak_rss_gb']:.1f} |{layout}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(plan) + "\n")


if __name__ == "__main__":
    main()
