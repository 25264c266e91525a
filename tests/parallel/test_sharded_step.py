"""One train step on 8 forced host devices (data=2, fsdp=4; data=2, fsdp=2, tensor=2) against one device.

XLA_FLAGS must be set before jax is imported, so the meshes run in one subprocess that shares the compiles;
it writes each mesh's post-step params and facts about their shardings, and this process compares them.

Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 an entry whose gradient is ~1e-9 (rounding of a zero)
moves by up to lr with the sign of that rounding, which differs between reduction orders. So this test raises eps to
1e-3, where the update stays proportional to the gradient (a gradient error of 1e-3 would still move a param by
~1e-3), and turns stochastic depth off (with it on, gradients near zero differed by ~1e-6 between meshes; the
deterministic model's agree to 2e-9). Adam's first moment, (1 - b1) g, is compared as well.
"""

import json
import os
import subprocess
import sys

import numpy as np
from jax.sharding import PartitionSpec as P

from tests.torch_ref import REPO

WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from diffbody_jax.config import load_config
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import global_batch, logical_rules
from diffbody_jax.training.engine import init_state, setup
from diffbody_jax.training.step import jit_train_step, make_train_step

seed, out = int(sys.argv[1]), sys.argv[2]
config = load_config("swinir:variant=tiny-diffbir", ["mesh.fsdp_min_size=64", "train.ema_decay=0.9",
                                                     "model.swinir.drop_path_rate=0.0", "optim.eps=1e-3"])
rng = np.random.default_rng(seed)
target = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
batch = {"degraded": np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32), "target": target}
facts, results = {}, {}
for name, shape in [("one", (1, 1, 1)), ("d2f4", (2, 4, 1)), ("d2f2t2", (2, 2, 2))]:
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = make_mesh(MeshConfig(*shape), devices)
    s = setup(config, mesh)
    state = init_state(s, config)
    step = jit_train_step(make_train_step(s.phase.loss_fn(s.module, config), s.tx, s.schedule, ema_decay=0.9),
                          s.state_shardings, mesh)
    with jax.set_mesh(mesh), logical_rules(s.rules):
        state, metrics = step(state, global_batch(batch, mesh))
    qkv = state.params["layers_0"]["residual_group"]["blocks_0"]["attn"]["qkv"]["kernel"]
    conv = state.params["conv_first"]["kernel"]
    facts[name] = {"qkv_spec": str(qkv.sharding.spec), "qkv_shard": list(qkv.addressable_shards[0].data.shape),
                   "qkv_shape": list(qkv.shape), "conv_spec": str(conv.sharding.spec),
                   "conv_shard": list(conv.addressable_shards[0].data.shape), "loss": float(metrics["loss"]),
                   "mu_spec": str(jax.tree.leaves(state.opt_state[1][0].mu["layers_0"]["residual_group"]["blocks_0"]
                                                 ["attn"]["qkv"])[1].sharding.spec)}
    flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "ema": state.ema,
                                                 "mu": state.opt_state[1][0].mu})[0]
    results.update({f"{name}:{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in flat})
np.savez(out + ".npz", **results)
json.dump(facts, open(out + ".json", "w"))
"""


def test_one_step_on_8_devices_equals_one_device(tmp_path, seed):
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(seed), out], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    arrays = np.load(out + ".npz")
    for mesh in ("d2f4", "d2f2t2"):
        keys = [k for k in arrays.files if k.startswith("one:")]
        worst = max(float(np.abs(arrays[k] - arrays[k.replace("one:", f"{mesh}:")]).max()) for k in keys)
        assert worst <= 1e-5, (mesh, worst)
        assert abs(facts[mesh]["loss"] - facts["one"]["loss"]) <= 1e-6
    # the qkv kernel [24, 72]: fsdp alone takes its largest axis; with tensor on the heads axis, fsdp takes the
    # other; the buffers are really split
    assert facts["d2f4"]["qkv_spec"] == str(P(None, "fsdp"))
    assert facts["d2f4"]["qkv_shard"] == [24, 72 // 4]
    assert facts["d2f2t2"]["qkv_spec"] == str(P("fsdp", "tensor"))
    assert facts["d2f2t2"]["qkv_shard"] == [24 // 2, 72 // 2]
    assert facts["d2f2t2"]["mu_spec"] == facts["d2f2t2"]["qkv_spec"]  # Adam's moment follows its param
    assert facts["one"]["qkv_shard"] == facts["one"]["qkv_shape"]
