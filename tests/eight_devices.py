"""The suite's checks on 8 forced host devices, run in one subprocess per test run.

XLA_FLAGS (--xla_force_host_platform_device_count=8) must be set before jax is imported, so these checks cannot run
in a pytest worker. `run_all` starts `python -m tests.eight_devices SEED FOLDER NAME...` once (the session fixture
`eight_devices` in conftest.py calls it), which runs each check in turn, sharing one interpreter and its compiles;
each check writes its results under FOLDER/NAME.*, or its traceback to FOLDER/NAME.error, and the tests that own the
claims (tests/parallel/test_sharded_step.py, tests/models/test_variables.py, tests/pipelines/test_sharded_restore.py)
read them through `outputs`, which raises the check's own traceback when it failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_step(seed: int, out: str, weights: str) -> None:
    """One SwinIR train step on meshes (data, fsdp, tensor) = (1,1,1), (2,4,1), (2,2,2): post-step params, EMA and
    Adam's first moment per mesh (out.npz), and the shardings of two kernels (out.json)."""
    import json

    import jax
    import numpy as np

    from diffbody_jax.config import load_config
    from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
    from diffbody_jax.parallel.sharding import global_batch, logical_rules
    from diffbody_jax.training.engine import init_state, setup
    from diffbody_jax.training.step import jit_train_step, make_train_step

    config = load_config("swinir:variant=tiny-diffbir", ["mesh.fsdp_min_size=64", "train.ema_decay=0.9",
                                                         "model.swinir.drop_path_rate=0.0", "optim.eps=1e-2"])
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    batch = {"degraded": np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32),
             "target": target}
    facts, results = {}, {}
    for name, shape in [("one", (1, 1, 1)), ("d2f4", (2, 4, 1)), ("d2f2t2", (2, 2, 2))]:
        mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
        s = setup(config, mesh)
        state = init_state(s, config)
        step = jit_train_step(make_train_step(s.phase.loss_fn(s.module, config), s.tx, s.schedule, ema_decay=0.9),
                              s.state_shardings, mesh)
        with jax.set_mesh(mesh), logical_rules(s.rules):
            state, metrics = step(state, global_batch(batch, mesh))
        qkv = state.params["layers_0"]["residual_group"]["blocks_0"]["attn"]["qkv"]["kernel"]
        conv = state.params["conv_first"]["kernel"]
        mu = state.opt_state[1][0].mu["layers_0"]["residual_group"]["blocks_0"]["attn"]["qkv"]
        facts[name] = {"qkv_spec": str(qkv.sharding.spec), "qkv_shard": list(qkv.addressable_shards[0].data.shape),
                       "qkv_shape": list(qkv.shape), "conv_spec": str(conv.sharding.spec),
                       "conv_shard": list(conv.addressable_shards[0].data.shape), "loss": float(metrics["loss"]),
                       "mu_spec": str(jax.tree.leaves(mu)[1].sharding.spec)}
        flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "ema": state.ema,
                                                     "mu": state.opt_state[1][0].mu})[0]
        results.update({f"{name}:{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in flat})
    np.savez(out + ".npz", **results)
    json.dump(facts, open(out + ".json", "w"))


def activation_constraints(seed: int, out: str, weights: str) -> None:
    """The tiny SD2.1 UNet's forward with and without a data mesh (rule batch -> data): the number of sharding
    constraints in each lowered program and the largest output difference (out.txt)."""
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from diffbody_jax.config import load_config
    from diffbody_jax.models.registry import build_model

    module = build_model(load_config("unet:variant=tiny-sd21").model)
    params = module.init_params(jax.random.key(seed))
    inputs = module.dummy_inputs(8)
    fn = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    plain = fn.lower(params, inputs).as_text().count("sharding_constraint")
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "data"),)):
        on_mesh = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
        constrained = on_mesh.lower(params, inputs).as_text().count("sharding_constraint")
        got = on_mesh(params, inputs)
    err = float(np.abs(np.asarray(got) - np.asarray(fn(params, inputs))).max())
    Path(out + ".txt").write_text(f"{plain} {constrained} {err}")


def _restore(version: str, seed: int, out: str, weights: str) -> None:
    import dataclasses
    import json

    import jax
    import numpy as np

    from diffbody_jax.parallel.sharding import ShardingRules
    from diffbody_jax.pipelines.restore import Restorer, RestoreSettings

    rng = np.random.default_rng(seed)
    degraded = rng.uniform(0, 1, (8, 64, 64, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (8, 64, 64, 3)).astype(np.float32)
    prompts = [f"a photo of person {i}" for i in range(8)]
    results, facts = {}, {}
    settings = RestoreSettings(version=version, steps=2, size=64, sampler="ddim" if version == "v1" else "ddpm")
    runs = [("one", jax.devices()[:1], settings), ("eight", jax.devices(), settings)]
    if version == "v1":  # the weights split over the 8 devices (those of >= 2^14 numbers: 64 weights, 77% of bytes)
        runs.append(("fsdp", jax.devices(), dataclasses.replace(settings, params="fsdp")))
    for name, devices, s in runs:
        restorer = Restorer(weights, s, devices=devices, rules=ShardingRules(fsdp_min_size=2**14))
        got = restorer.restore(jax.random.key(seed), degraded, pose, prompts)
        results.update({f"{version}:{name}:{k}": v for k, v in got.items()})
        facts[f"{version}:{name}"] = restorer.mesh.shape["data"]
        leaves = jax.tree.leaves(restorer.variables)
        facts[f"{version}:{name}:placement"] = {
            "placement": restorer.placement, "mesh": dict(restorer.mesh.shape),
            "split_leaves": sum(not x.is_fully_replicated for x in leaves), "leaves": len(leaves),
            "bytes": sum(x.nbytes for x in leaves),
            "device0_bytes": sum(sh.data.nbytes for x in leaves for sh in x.addressable_shards
                                 if sh.device == jax.devices()[0])}
    np.savez(out + ".npz", **results)
    json.dump(facts, open(out + ".json", "w"))


def restore_v1(seed: int, out: str, weights: str) -> None:
    """v1 restoration of a batch of 8 on one device, split over 8 with the weights replicated, and with the weights
    split too (params="fsdp") (out.npz: every intermediate; out.json: each restorer's data-axis size and placement)."""
    _restore("v1", seed, out, weights)


def restore_v2(seed: int, out: str, weights: str) -> None:
    """As restore_v1, for v2 (slow: not in the suite's default subprocess)."""
    _restore("v2", seed, out, weights)


def restore_plan(seed: int, out: str, weights: str) -> None:
    """`pipelines.plan.plan_restore` of the tiny v1 on 8 devices, batch 8, weights replicated and FSDP-split (every
    weight of at least 256 numbers: the tiny models have one weight over the default 2^18) (out.json: both plans)."""
    import dataclasses
    import json

    from diffbody_jax.pipelines.plan import plan_restore

    plans = {params: dataclasses.asdict(plan_restore("v1", 64, 64, batch=8, steps=2, variant="tiny", params=params,
                                                     fsdp_min_size=256))
             for params in ("replicated", "fsdp")}
    Path(out + ".json").write_text(json.dumps(plans))


CHECKS = {f.__name__: f for f in (train_step, activation_constraints, restore_v1, restore_v2, restore_plan)}
DEFAULT = ("train_step", "activation_constraints", "restore_v1", "restore_plan")


def run_all(folder: Path, seed: int, weights: Path, names=DEFAULT) -> Path:
    """Runs the named checks in one subprocess on 8 host devices; returns `folder`. Each check's failure is kept
    in its own .error file, so one broken check fails only its own test."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    proc = subprocess.run([sys.executable, "-m", "tests.eight_devices", str(seed), str(folder), str(weights), *names],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"the 8-device subprocess exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return folder


def outputs(folder: Path, name: str) -> str:
    """The path prefix of check `name`'s outputs in `folder`; raises the check's traceback if it failed."""
    error = Path(folder) / f"{name}.error"
    if error.exists():
        raise AssertionError(f"8-device check {name!r} failed in the subprocess:\n{error.read_text()}")
    prefix = str(Path(folder) / name)
    if not any(Path(folder).glob(f"{name}.*")):
        raise AssertionError(f"8-device check {name!r} wrote nothing in {folder}")
    return prefix


def _main(argv: list[str]) -> None:
    seed, folder, weights, names = int(argv[0]), Path(argv[1]), argv[2], argv[3:]
    import jax

    assert jax.device_count() == 8, f"XLA_FLAGS gave {jax.device_count()} devices, not 8"
    for name in names:
        try:
            CHECKS[name](seed, str(folder / name), weights)
        except Exception:  # kept for that check's test; the others still run
            (folder / f"{name}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    _main(sys.argv[1:])
