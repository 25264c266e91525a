"""bench/train_plan.py as the suite runs it: the tiny SwinIR phase's step compiled for 8 forced host devices with
every weight of at least 256 numbers FSDP-split (the paper-size phases are a bench run by hand: docs/scaling.md)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def test_train_plan_reads_the_sharded_state_and_the_collectives(tmp_path):
    out = tmp_path / "plans.jsonl"
    proc = subprocess.run([sys.executable, "bench/train_plan.py", "--devices", "8", "--variant", "tiny-diffbir",
                           "--phases", "swinir", "--set", "data.batch_size=8", "--set", "mesh.fsdp_min_size=256",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| swinir | 8 at 64x64 (accum 1) | 1x8x1 |" in proc.stdout, proc.stdout
    plan = json.loads(out.read_text().splitlines()[0])
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["platform"] == "cpu"

    # the params counted from the model itself: those of >= 256 numbers split 8 ways (all dims here divide), the
    # rest whole on every device
    params = nn.unbox(build_model(load_config("swinir:variant=tiny-diffbir").model).abstract_variables()["params"])
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    per_device = sum(n / 8 if n >= 256 else n for n in sizes) * 4 / GIB
    assert abs(plan["params_gib"] - per_device) <= 0.02 * per_device, (plan["params_gib"], per_device)
    assert plan["frozen_gib"] == 0  # stage 0 trains every weight
    # Adam's two moments per param, sharded like it (no EMA in this config)
    assert abs(plan["optimizer_gib"] - 2 * plan["params_gib"]) <= 0.01 * plan["params_gib"]
    # FSDP's traffic: weights gathered for the forward and backward, gradients reduced over the devices
    kinds = plan["collectives"]
    assert kinds["all-gather"] > 0 and kinds["all-reduce"] + kinds["reduce-scatter"] > 0, kinds
    assert plan["gathered_peak_gib"] > 0 and plan["largest_layer_gib"] > 0
    assert plan["compile_s"] > 0 and plan["peak_rss_gb"] > 0.1
