"""`diffbody restore --scan-layers`: v2 with its UNets and ControlNets scanning their transformer stacks (stage 2's
tiny SDXL has depth-2 stacks) restores the images of the unrolled models from the same weight files."""

import dataclasses

import jax
import numpy as np

from diffbody_jax.pipelines.restore import Restorer, RestoreSettings

SETTINGS = RestoreSettings(version="v2", steps=1, sampler="ddim", size=64)


def test_scanned_stacks_restore_the_unrolled_images(stand_in_weights, rng):
    degraded = rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, degraded.shape).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    unrolled = Restorer(stand_in_weights, SETTINGS).restore(key, degraded, pose, ["a person"])
    scanned = Restorer(stand_in_weights, dataclasses.replace(SETTINGS, scan_layers=True))
    unet = scanned.variables["stage2"]["params"]["stage2"]["unet"]
    assert "transformer_blocks" in unet["mid_block"]["attentions_0"]  # the weights were stacked once, on loading
    got = scanned.restore(key, degraded, pose, ["a person"])
    for name in ("restored", "i_res"):
        err = np.abs(got[name] - unrolled[name]).max()
        assert err <= 1e-4, (name, err)
    assert np.abs(unrolled["restored"] - unrolled["i_ir"]).max() > 1e-3  # stage 2 changed the image
