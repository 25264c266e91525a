"""The v2 restoration pipeline on tiny stand-in weights: one jitted program from degraded photos to restorations
with every intermediate; the stages called one by one give the same images; a key reproduces them; sizes that
are not multiples of the VAE factor are refused."""

import jax
import numpy as np
import pytest

from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.models.unet import SDXLText
from diffbody_jax.pipelines.stand_in import write_stand_in_weights
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import load_schedule, load_v2_models


@pytest.mark.slow  # ~55 s (two v2 compiles); v2 runs end to end in the default suite in cli/test_demo.py
def test_one_program_equals_the_stages_chained(tmp_path, rng):
    weights = write_stand_in_weights(tmp_path / "w", seed=7)
    stage1, stage2, variables = load_v2_models(weights)
    pipe = V2Pipeline(stage1, stage2, load_schedule(weights, "sd21"), load_schedule(weights, "sdxl"),
                      SamplerConfig(method="ddim", num_steps=2), SamplerConfig(method="ddpm", num_steps=2))
    b, s = 2, 32
    degraded = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
    context = rng.normal(0, 1, (b, 77, stage1.text_encoder.config.hidden_size)).astype(np.float32)
    unet = stage2.stage2.unet.config
    text = SDXLText(rng.normal(0, 1, (b, 77, unet.cross_attention_dim)).astype(np.float32),
                    rng.normal(0, 1, (b, stage2.text_encoder_2.config.projection_dim)).astype(np.float32),
                    np.tile(np.float32([[s, s, 0, 0, s, s]]), (b, 1)))
    key = jax.random.key(3)
    out = pipe(variables, key, degraded, pose, (context, text))
    assert out["restored"].shape == degraded.shape and out["depth"].shape == (b, s, s, 1)
    assert np.isfinite(np.asarray(out["restored"])).all()

    k1, k2 = jax.random.split(key)
    i_ir = pipe.regress(variables, degraded)
    c_p, c_r = pipe.stage1_condition(variables, i_ir, pose)
    branches = pipe.stage1_decode(variables, pipe.stage1_denoise(variables, k1, c_p, c_r, context))
    priors = pipe.stage2_priors(i_ir, pose, branches["depth"], branches["normal"])
    z0 = pipe.stage2_denoise(variables, k2, priors, text, pipe.image_features(variables, branches["i_res"]))
    by_hand = pipe.stage2_decode(variables, z0)
    for name, image in (("i_ir", i_ir), ("i_res", branches["i_res"]), ("normal", branches["normal"]),
                        ("restored", by_hand)):
        np.testing.assert_allclose(np.asarray(image), np.asarray(out[name]), atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(pipe(variables, key, degraded, pose, (context, text))["restored"]),
                                  np.asarray(out["restored"]))
    with pytest.raises(ValueError, match="multiple of the VAE factor 8"):
        pipe(variables, key, degraded[:, :28, :28], pose[:, :28, :28], (context, text))
