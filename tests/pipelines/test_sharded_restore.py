"""Data-parallel restoration: a batch of 8 split over 8 forced host devices gives the images one device gives
(v1 in the default suite, v2 slow; tiny stand-in weights, max abs error <= 1e-5); the restorer's mesh spans the 8
devices on its data axis. XLA_FLAGS must be set before jax is imported, so both meshes run in one subprocess: v1 in
the suite's one 8-device subprocess (tests/eight_devices.py), v2 in one of its own."""

import json

import numpy as np
import pytest

from tests import eight_devices as eight

INTERMEDIATES = {"v1": ("restored", "i_reg", "attention"), "v2": ("restored", "i_ir", "i_res", "depth", "normal")}


@pytest.mark.parametrize("version", ["v1", pytest.param("v2", marks=pytest.mark.slow)])  # v2: ~60 s more
def test_batch_on_8_devices_equals_one_device(version, eight_devices, stand_in_weights, tmp_path):
    if version == "v1":
        folder, seed = eight_devices
    else:  # its own subprocess, with only this check
        folder, seed = eight.run_all(tmp_path, eight_devices[1], stand_in_weights, ["restore_v2"]), eight_devices[1]
    out = eight.outputs(folder, f"restore_{version}")
    facts = json.loads(open(out + ".json").read())
    assert facts == {f"{version}:one": 1, f"{version}:eight": 8}
    arrays = np.load(out + ".npz")
    for key in INTERMEDIATES[version]:
        one, split = arrays[f"{version}:one:{key}"], arrays[f"{version}:eight:{key}"]
        assert one.shape[0] == 8 and np.abs(one - split).max() <= 1e-5, (version, key, np.abs(one - split).max(),
                                                                         f"seed {seed}")
    assert np.abs(arrays[f"{version}:one:restored"][0] - arrays[f"{version}:one:restored"][1]).max() > 1e-3
