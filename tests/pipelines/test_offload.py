"""v2 with `offload` (`diffbody restore --offload`): the weights stay in host memory and each program (text encoding,
stage 1, stage 2) gets only its own on the devices, so a device holds one stage at a time; the images equal the
one-program restoration's. The two denoisers are stubbed (`test_train_restore_inputs.captured`), as in
test_recaption.py: what is under test is which weights each program is given, not the models."""

import dataclasses

import jax
import numpy as np
import pytest

from diffbody_jax.pipelines.restore import Restorer
from tests.pipelines.test_recaption import SETTINGS, STUBS
from tests.pipelines.test_train_restore_inputs import captured


def test_offload_gives_the_one_programs_images_from_one_stage_at_a_time(stand_in_weights, rng):
    degraded = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, degraded.shape).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    with captured(*STUBS, stub=STUBS):
        whole = Restorer(stand_in_weights, SETTINGS).restore(key, degraded, pose, ["a", "b"])
        offloaded = Restorer(stand_in_weights, dataclasses.replace(SETTINGS, offload=True))
        got = offloaded.restore(key, degraded, pose, ["a", "b"])
    assert offloaded.variables is None  # nothing held on the devices between programs
    for name in ("restored", "i_ir", "i_res", "depth", "normal"):
        err = np.abs(got[name] - whole[name]).max()
        assert err <= 1e-5, (name, err)
    assert np.abs(whole["restored"] - whole["i_ir"]).max() > 1e-3  # the comparison is not of two copies of I_ir

    stage1 = offloaded._on_devices("stage1")
    assert set(stage1) == {"stage1"} and set(stage1["stage1"]["params"]) == set(
        offloaded.host_variables["stage1"]["params"])
    text = offloaded._on_devices("text")
    assert {m for stage in text.values() for tree in stage.values() for m in tree} == {"text_encoder",
                                                                                      "text_encoder_2"}
    assert set(offloaded._on_devices("regress")["stage1"]["params"]) == {"swinir"}


def test_offload_is_v2s():
    with pytest.raises(ValueError, match="v1 has one stage"):
        dataclasses.replace(SETTINGS, version="v1", offload=True)
