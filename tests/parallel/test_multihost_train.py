"""Two processes joined by jax.distributed over loopback (2 CPU devices each) train the toy phase; they agree with
one process driving 4 devices: the same global batches, step by step, and the same params (1e-5)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from diffbody_jax.data.sample_set import write_sample_set
from tests.torch_ref import REPO

STEPS = 4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir, manifest, devices, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "train", "--config", "configs/swinir.py:variant=tiny-diffbir", "--workdir",
           str(workdir), f"--config.data.manifest={manifest}", f"--config.train.steps={STEPS}",
           "--config.train.log_every=1", "--config.checkpoint.every=2", "--config.mesh.fsdp=2",
           "--config.mesh.fsdp_min_size=256", "--config.data.degradation=blur2-noise40",
           "--config.model.swinir.drop_path_rate=0.0", "--config.optim.eps=1e-3", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one(tmp_path):
    """optim.eps=1e-3 and no stochastic depth, as in test_sharded_step.py: Adam's first steps then depend smoothly
    on the gradients, whose all-reduce order differs between the two set-ups."""
    manifest = write_sample_set(tmp_path / "sample")
    address = f"127.0.0.1:{_port()}"
    procs = [_run(tmp_path / "multi", manifest, 2, "--coordinator", address, "--num_processes", "2",
                  "--process_id", str(i)) for i in range(2)]
    procs.append(_run(tmp_path / "single", manifest, 4))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("multi", "single")}
    assert [r["step"] for r in rows["multi"]] == list(range(1, STEPS + 1))
    assert [r["record"] for r in rows["multi"]] == [r["record"] for r in rows["single"]]
    assert len(rows["multi"][0]["record"]) == 4  # the global batch, assembled from two slices of 2
    np.testing.assert_allclose([r["loss"] for r in rows["multi"]], [r["loss"] for r in rows["single"]], rtol=1e-4)
    multi = load_file(tmp_path / "multi" / "export" / "model.safetensors")
    single = load_file(tmp_path / "single" / "export" / "model.safetensors")
    assert multi.keys() == single.keys()
    worst = max(float(np.abs(multi[k] - single[k]).max()) for k in multi)
    assert worst <= 1e-5, worst
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "4" / "data").iterdir()
                  if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]
