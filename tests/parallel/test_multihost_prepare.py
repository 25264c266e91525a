"""`diffbody prepare` from two processes joined over loopback: each writes its own shard (its round-robin share of
every bucket), and together they hold what one process writes (1e-5)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffbody_jax.data.sample_set import write_sample_set
from tests.parallel.test_multihost_train import _port
from tests.torch_ref import REPO, optional

pytestmark = pytest.mark.skipif(optional("transformers") is None, reason="CLIP's tokenizer comes from transformers")


def _prepare(out, manifest, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "diffbody_jax", "prepare", "--config", "configs/stage1_joint_unet.py:variant=tiny",
           "--out", str(out), f"--config.data.manifest={manifest}", "--config.data.random_crop=False",
           "--config.data.batch_size=2", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _entries(folder, process: int) -> dict:
    """Every array process `process` wrote (its shards, as its index lists them)."""
    index = next(folder.glob(f"index-{process:05d}-of-*.json"))
    out = {}
    for name in json.loads(index.read_text())["shards"]:
        with np.load(folder / name) as z:
            out.update({k: z[k] for k in z.files})
    return out


@pytest.mark.slow  # ~2 minutes: three processes compile the encoders
def test_two_processes_write_what_one_writes(tmp_path):
    manifest = write_sample_set(tmp_path / "sample", stand_in_priors=True)
    port = _port()
    procs = [_prepare(tmp_path / "two", manifest, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                      "--process_id", str(i)) for i in range(2)]
    procs.append(_prepare(tmp_path / "one", manifest))
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    one = _entries(tmp_path / "one", 0)
    two = {}
    for i in range(2):
        mine = _entries(tmp_path / "two", i)
        assert {k.split("/")[0] for k in mine} == {str(r) for r in range(i, 4, 2)}  # round robin within the bucket
        two.update(mine)
    assert sorted(one) == sorted(two)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)
