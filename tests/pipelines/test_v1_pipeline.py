"""The v1 restoration pipeline on the tiny v1 group (random weights): one jitted program from degraded photos to
restorations with its intermediates, which match constructions from the member modules; classifier-free guidance and
part-loss guidance change it; a key reproduces it."""

import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.files import read_json
from diffbody_jax.models.bodypart import preprocess
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.v1 import V1Pipeline
from tests.torch_ref import REPO


@pytest.fixture(scope="module")
def parts():
    group = build_model(load_config("v1_controlnet:variant=tiny").model)
    # host-drawn stand-in weights: fast, and the ControlNet's outputs are not zero (a fresh init's are), so the
    # condition matters
    variables = random_variables(group, seed=0)
    schedule = NoiseSchedule.from_dict(read_json(REPO / "configs/diffusers/sd21-base/scheduler/scheduler_config.json"))
    return group, variables, schedule


def _inputs(rng, b=2, size=32):
    degraded = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    context = rng.normal(0, 1, (b, 77, 24)).astype(np.float32)
    return degraded, pose, context


def test_one_program_returns_the_restoration_and_its_intermediates(parts, rng):
    group, variables, schedule = parts
    pipe = V1Pipeline(group, schedule, SamplerConfig(method="ddim", num_steps=2))
    degraded, pose, context = _inputs(rng)
    key = jax.random.key(5)
    out = pipe(variables, key, degraded, pose, context)
    assert out["restored"].shape == degraded.shape and out["attention"].shape == (2, 32, 32, 1)
    assert np.isfinite(np.asarray(out["restored"])).all()
    # the intermediates against independent constructions from the member modules (what reaches the ControlNet is
    # compared with the training loss's construction in test_train_restore_inputs.py)
    i_reg = np.clip(np.asarray(group.swinir.apply({"params": variables["params"]["swinir"]}, degraded)), 0, 1)
    np.testing.assert_allclose(np.asarray(out["i_reg"]), i_reg, atol=1e-5)
    net = group.bodypart
    foreground = net.apply(group.member_variables(variables, "bodypart"), preprocess(i_reg, net.config)).foreground
    attention = jax.image.resize(foreground[..., None], (2, 32, 32, 1), "linear")
    np.testing.assert_allclose(np.asarray(out["attention"]), np.clip(np.asarray(attention), 0, 1), atol=1e-5)
    again = pipe(variables, key, degraded, pose, context)["restored"]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out["restored"]))


@pytest.mark.slow  # ~30 s more: three more compiles of the sampler
def test_cfg_and_part_guidance_change_the_result(parts, rng):
    group, variables, schedule = parts
    degraded, pose, context = _inputs(rng)
    key = jax.random.key(6)
    plain = V1Pipeline(group, schedule, SamplerConfig(method="ddpm", num_steps=2))(variables, key, degraded, pose,
                                                                                    context)["restored"]
    cfg = V1Pipeline(group, schedule, SamplerConfig(method="ddpm", num_steps=2, cfg_scale=4.0))(
        variables, key, degraded, pose, context, np.zeros_like(context))["restored"]
    guided = V1Pipeline(group, schedule, SamplerConfig(method="ddpm", num_steps=2, guidance_scale=50.0))(
        variables, key, degraded, pose, context)["restored"]
    assert np.abs(np.asarray(cfg) - np.asarray(plain)).max() > 1e-4
    assert np.abs(np.asarray(guided) - np.asarray(plain)).max() > 1e-4
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        V1Pipeline(group, schedule, SamplerConfig(num_steps=1))(variables, key, degraded[:, :31, :31],
                                                                 pose[:, :31, :31], context)
