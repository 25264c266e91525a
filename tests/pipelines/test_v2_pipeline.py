"""The v2 restoration pipeline on the tiny stand-in weights.

Stage by stage, v2 is checked against independent constructions elsewhere: the joint UNet's and the stage-2
model's inputs against the training losses' (tests/pipelines/test_train_restore_inputs.py), the whole program
through `diffbody restore` against diffusers' scheduler and the VAE applied directly
(tests/pipelines/test_trained_run_restores.py), and end to end in the demo (tests/cli/test_demo.py). Here: the one
program returns every intermediate at its documented shape and range, the key reproduces it, and a size off the
VAE factor is refused before anything is traced."""

import jax
import numpy as np
import pytest

from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.models.unet import SDXLText
from diffbody_jax.pipelines.v2 import V2Pipeline
from diffbody_jax.pipelines.weights import load_schedule, load_v2_models


@pytest.fixture(scope="module")
def v2(stand_in_weights):
    stage1, stage2, variables = load_v2_models(stand_in_weights)
    pipe = V2Pipeline(stage1, stage2, load_schedule(stand_in_weights, "sd21"), load_schedule(stand_in_weights, "sdxl"),
                      SamplerConfig(method="ddim", num_steps=2), SamplerConfig(method="ddpm", num_steps=2))
    return pipe, variables


def _inputs(pipe, rng, b, s):
    degraded = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
    context = rng.normal(0, 1, (b, 77, pipe.stage1.text_encoder.config.hidden_size)).astype(np.float32)
    unet = pipe.stage2.stage2.unet.config
    text = SDXLText(rng.normal(0, 1, (b, 77, unet.cross_attention_dim)).astype(np.float32),
                    rng.normal(0, 1, (b, pipe.stage2.text_encoder_2.config.projection_dim)).astype(np.float32),
                    np.tile(np.float32([[s, s, 0, 0, s, s]]), (b, 1)))
    return degraded, pose, (context, text)


def test_one_program_returns_every_intermediate_and_a_key_reproduces_it(v2, rng):
    pipe, variables = v2
    b, s = 2, 32
    degraded, pose, text = _inputs(pipe, rng, b, s)
    key = jax.random.key(3)
    out = pipe(variables, key, degraded, pose, text)
    shapes = {"restored": (b, s, s, 3), "i_ir": (b, s, s, 3), "i_res": (b, s, s, 3), "depth": (b, s, s, 1),
              "normal": (b, s, s, 3)}
    for name, shape in shapes.items():
        image = np.asarray(out[name])
        assert image.shape == shape and np.isfinite(image).all(), name
    # I_ir is SwinIR's regression of the input, computed here from the module alone
    i_ir = pipe.stage1.swinir.apply({"params": variables["stage1"]["params"]["swinir"]}, degraded)
    np.testing.assert_allclose(np.asarray(out["i_ir"]), np.clip(np.asarray(i_ir), 0, 1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pipe(variables, key, degraded, pose, text)["restored"]),
                                  np.asarray(out["restored"]))


def test_a_size_off_the_vae_factor_is_refused_before_tracing(v2, rng):
    pipe, variables = v2
    degraded, pose, text = _inputs(pipe, rng, 1, 28)
    with pytest.raises(ValueError, match="28 x 28 is not a multiple of the VAE factor 8"):
        pipe(variables, jax.random.key(0), degraded, pose, text)
