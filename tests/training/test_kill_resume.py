"""A real SIGKILL while the async save of step n is in flight, right after checkpoint n - 1 completed: checkpoint
n - 1 stays loadable. The rerun, with a larger train.steps, resumes from it, continues past the first run's target,
and ends bit-identical (params, EMA, optimizer state, data position) to an uninterrupted run, having seen the same
batches in the same order."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.engine import setup, train
from tests.torch_ref import REPO

STEPS = 8  # enough to resume mid-way and run past the first target; each step checkpoints
FIRST_TARGET = 6  # the killed run's train.steps; the rerun asks for STEPS


def _overrides(manifest, steps=STEPS):
    return [f"data.manifest={manifest}", f"train.steps={steps}", "train.log_every=1", "checkpoint.every=1",
            "checkpoint.keep=50", "train.ema_decay=0.5", "data.degradation=blur2-noise40"]


def _start(workdir, manifest, steps=STEPS):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "train", "--config", "configs/swinir.py:variant=tiny-diffbir", "--workdir",
           str(workdir), *(f"--config.{o}" for o in _overrides(manifest, steps))]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=300):
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("timed out waiting to kill the run")


def _complete_steps(workdir):
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _saving(workdir):
    folder = workdir / "checkpoints"
    return folder.exists() and any("tmp" in p.name for p in folder.iterdir())


def test_sigkill_during_an_async_save_then_a_longer_rerun_is_exact(tmp_path):
    manifest = write_sample_set(tmp_path / "sample")
    killed = tmp_path / "killed"

    proc = _start(killed, manifest, FIRST_TARGET)
    _kill_when(proc, lambda: len(_complete_steps(killed)) >= 2 and _saving(killed))
    steps = _complete_steps(killed)
    assert steps and steps[-1] < FIRST_TARGET
    config = load_config("swinir:variant=tiny-diffbir", _overrides(manifest))
    s = setup(config)
    state = Checkpoints(killed, 1, 50).restore(steps[-1], s.abstract_state, s.state_shardings)  # still loadable
    assert int(state.step) == steps[-1]

    proc = _start(killed, manifest)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    train(config, tmp_path / "straight")
    a = Checkpoints(killed, 1, 50).restore(STEPS, s.abstract_state, s.state_shardings)
    b = Checkpoints(tmp_path / "straight", 1, 50).restore(STEPS, s.abstract_state, s.state_shardings)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("killed", "straight")}
    assert [r["step"] for r in rows["killed"]] == list(range(1, STEPS + 1))
    assert [r["record"] for r in rows["killed"]] == [r["record"] for r in rows["straight"]]
    assert [r["loss"] for r in rows["killed"]] == [r["loss"] for r in rows["straight"]]
