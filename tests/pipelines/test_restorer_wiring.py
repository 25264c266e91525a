"""The Restorer's wiring on the stand-in weights: classifier-free guidance with a negative prompt is the pipeline
driven by hand with the two text conditions; part-loss guidance is the sampler with the guidance built by hand from
the contract's part-loss settings (with remat in its backward pass); a second Restorer of the same folder and
settings reuses the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.conditioning.prompts import load_tokenizer, sd21_prompt_embeds, tokenize
from diffbody_jax.diffusion.contract import read_contract
from diffbody_jax.diffusion.part_guidance import PartLossConfig, make_part_guidance, part_guidance_aux
from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler
from diffbody_jax.models.unet import UNet2DConditionModel
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.pipelines.weights import load_v1_models
from tests.pipelines.test_train_restore_inputs import UNET_STUB, captured

PROMPTS = ["a man on a bench", "a girl running"]


def _inputs(rng):
    degraded = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    pose = (rng.uniform(0, 1, (2, 64, 64, 3)) > 0.95).astype(np.float32)
    return degraded, pose


def _context(group, variables, texts):
    return sd21_prompt_embeds(group.text_encoder, variables["params"]["text_encoder"],
                              tokenize(load_tokenizer(None, "!"), texts))


def test_cfg_with_a_negative_prompt_is_the_pipeline_with_two_text_conditions(stand_in_weights, rng):
    settings = RestoreSettings(version="v1", steps=1, sampler="ddim", size=64, cfg=3.0, negative_prompt="blurry")
    degraded, pose = _inputs(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    out = Restorer(stand_in_weights, settings).restore(key, degraded, pose, PROMPTS)

    group, variables = load_v1_models(stand_in_weights)
    contract = read_contract(stand_in_weights / "v1_controlnet")
    pipe = V1Pipeline(group, contract.schedule(), SamplerConfig(method="ddim", num_steps=1, cfg_scale=3.0))
    by_hand = pipe(variables, key, degraded, pose, _context(group, variables, PROMPTS),
                   _context(group, variables, ["blurry"] * 2))
    np.testing.assert_allclose(out["restored"], np.asarray(by_hand["restored"]), atol=1e-5)
    swapped = pipe(variables, key, degraded, pose, _context(group, variables, PROMPTS),
                   _context(group, variables, ["sharp"] * 2))  # the negative prompt reaches the result
    assert np.abs(out["restored"] - np.asarray(swapped["restored"])).max() > 1e-5

    # a second Restorer of the same folder and settings: the traced program is reused, nothing compiles
    compiled = V1Pipeline.__call__._cache_size()
    again = Restorer(stand_in_weights, settings).restore(key, degraded, pose, PROMPTS)
    assert V1Pipeline.__call__._cache_size() == compiled
    np.testing.assert_array_equal(again["restored"], out["restored"])


def test_part_loss_guidance_is_the_sampler_with_the_guidance_built_by_hand(stand_in_weights, rng):
    scale = 40.0
    settings = RestoreSettings(version="v1", steps=1, sampler="ddpm", size=64, guidance=scale)
    degraded, pose = _inputs(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    # the denoiser is stubbed on both sides (0.5 z_t: the gradient still runs through the VAE decode and the part
    # network, whose wiring is under test; the UNet's own backward would only add minutes of compile)
    with captured(UNet2DConditionModel, stub=UNET_STUB):
        restorer = Restorer(stand_in_weights, settings)
        out = restorer.restore(key, degraded, pose, PROMPTS)
    # the guidance's backward pass rematerialises UNet, ControlNet and VAE blocks on accelerators, not on XLA:CPU
    # (which drops remat's barriers: no memory saved, time lost; pipelines.weights.guidance_remat)
    built, on_accelerator = restorer.pipeline.group, jax.default_backend() != "cpu"
    assert [bool(built.unet.remat), bool(built.controlnet.remat), bool(built.vae.remat)] == [on_accelerator] * 3
    assert not built.swinir.remat

    group, variables = load_v1_models(stand_in_weights)
    contract = read_contract(stand_in_weights / "v1_controlnet")
    p = contract.part_loss
    part_loss = PartLossConfig(p["distance"], p["temperature"], p["visibility"])
    sampler = SamplerConfig(method="ddpm", num_steps=1, guidance_scale=scale, guidance_start=p["start"],
                            guidance_end=p["end"], guidance_schedule=p["schedule"])
    pipe = V1Pipeline(group, contract.schedule(), SamplerConfig(method="ddpm", num_steps=1))  # for its stages
    i_reg = out["i_reg"]
    control = pipe.condition(variables, i_reg, pose, pipe.attention(variables, i_reg).latent)
    params = {"unet": variables["params"]["unet"], "controlnet": variables["params"]["controlnet"]}

    def eps(params, z, t, cond):
        return 0.5 * z  # the stub the Restorer's UNet ran as

    run = make_sampler(eps, contract.schedule(), sampler, make_part_guidance(group.vae, group.bodypart, part_loss))
    k_noise, k_steps = jax.random.split(key)
    z_t = jax.random.normal(k_noise, control.shape[:-1] + (group.unet.config.out_channels,), jnp.float32)
    aux = part_guidance_aux(group.bodypart, group.member_variables(variables, "bodypart"), variables["params"]["vae"],
                            jnp.asarray(i_reg))
    z0 = run(k_steps, z_t, (_context(group, variables, PROMPTS), control), aux=aux, params=params).sample
    # two separately compiled gradient programs: 1e-6 apart on most seeds, 1.5e-5 on a few pixels of some (seed
    # 680372822), so the fp32 bound; the guidance itself moves the image by 3e-2 or more (below)
    np.testing.assert_allclose(out["restored"], np.asarray(pipe.decode(variables, z0)), atol=1e-4)
    unguided = make_sampler(eps, contract.schedule(), SamplerConfig(method="ddpm", num_steps=1))(
        k_steps, z_t, (_context(group, variables, PROMPTS), control), params=params).sample
    moved = np.abs(out["restored"] - np.asarray(pipe.decode(variables, unguided))).max()
    assert moved > 1e-2, moved  # the guidance moved the restoration, 100x the bound above
