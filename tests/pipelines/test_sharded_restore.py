"""Data-parallel restoration: a batch of 8 split over 8 forced host devices gives the images one device gives
(v1 in the default suite, v2 slow; tiny stand-in weights, max abs error <= 1e-5); the restorer's mesh spans the 8
devices on its data axis. XLA_FLAGS must be set before jax is imported, so both meshes run in one subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.torch_ref import REPO

WORKER = r"""
import json, sys
import jax, numpy as np
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.stand_in import write_stand_in_weights

seed, out, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
weights = write_stand_in_weights(out + "-weights", seed=seed % 1000, versions=("v1", version))
rng = np.random.default_rng(seed)
degraded = rng.uniform(0, 1, (8, 64, 64, 3)).astype(np.float32)
pose = rng.uniform(0, 1, (8, 64, 64, 3)).astype(np.float32)
prompts = [f"a photo of person {i}" for i in range(8)]
results, facts = {}, {}
settings = RestoreSettings(version=version, steps=2, size=64, sampler="ddim" if version == "v1" else "ddpm")
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    restorer = Restorer(weights, settings, devices=devices)
    out_ = restorer.restore(jax.random.key(seed), degraded, pose, prompts)
    results.update({f"{version}:{name}:{k}": v for k, v in out_.items()})
    facts[f"{version}:{name}"] = restorer.mesh.shape["data"]
np.savez(out + ".npz", **results)
json.dump(facts, open(out + ".json", "w"))
"""


INTERMEDIATES = {"v1": ("restored", "i_reg", "attention"), "v2": ("restored", "i_ir", "i_res", "depth", "normal")}


@pytest.mark.parametrize("version", ["v1", pytest.param("v2", marks=pytest.mark.slow)])  # v2: ~60 s more
def test_batch_on_8_devices_equals_one_device(tmp_path, seed, version):
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(seed), out, version], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    assert facts == {f"{version}:one": 1, f"{version}:eight": 8}
    arrays = np.load(out + ".npz")
    for key in INTERMEDIATES[version]:
        one, eight = arrays[f"{version}:one:{key}"], arrays[f"{version}:eight:{key}"]
        assert one.shape[0] == 8 and np.abs(one - eight).max() <= 1e-5, (version, key, np.abs(one - eight).max())
    assert np.abs(arrays[f"{version}:one:restored"][0] - arrays[f"{version}:one:restored"][1]).max() > 1e-3
