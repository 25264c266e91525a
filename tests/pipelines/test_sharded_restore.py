"""Data-parallel restoration: a batch of 8 split over 8 forced host devices gives the images one device gives
(v1 in the default suite, v2 slow; tiny stand-in weights, max abs error <= 1e-5); the restorer's mesh spans the 8
devices on its data axis; with params="fsdp" the weights are split over an fsdp axis of the 8 and the images are
the same. XLA_FLAGS must be set before jax is imported, so both meshes run in one subprocess: v1 in
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
    assert facts[f"{version}:one"] == 1 and facts[f"{version}:eight"] == 8
    runs = ["eight", "fsdp"] if version == "v1" else ["eight"]
    arrays = np.load(out + ".npz")
    for key in INTERMEDIATES[version]:
        for run in runs:
            one, split = arrays[f"{version}:one:{key}"], arrays[f"{version}:{run}:{key}"]
            assert one.shape[0] == 8 and np.abs(one - split).max() <= 1e-5, (version, run, key,
                                                                             np.abs(one - split).max(), f"seed {seed}")
    assert np.abs(arrays[f"{version}:one:restored"][0] - arrays[f"{version}:one:restored"][1]).max() > 1e-3


def test_fsdp_restore_splits_the_weights_over_the_devices(eight_devices):
    """params="fsdp" on 8 forced devices (every weight of at least 2^14 numbers split: 64 of the stand-in v1's
    weights, 77% of its bytes): one fsdp axis of 8, those weights split, each device holding under 40% of the bytes a
    replicated device holds (23% + 77% / 8 = 33% if every one is split); its images equal one device's (above)."""
    out = eight.outputs(eight_devices[0], "restore_v1")
    facts = json.loads(open(out + ".json").read())
    replicated, fsdp = facts["v1:eight:placement"], facts["v1:fsdp:placement"]
    assert replicated["placement"] == "replicated" and replicated["split_leaves"] == 0
    assert replicated["device0_bytes"] == replicated["bytes"]
    assert fsdp["placement"] == "fsdp" and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert fsdp["split_leaves"] >= 50, fsdp
    assert fsdp["bytes"] == replicated["bytes"] and fsdp["device0_bytes"] < 0.4 * fsdp["bytes"], fsdp
