"""Scan samplers: trajectory parity with diffusers' schedulers, one compilation, guidance, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.diffusion.samplers import SamplerConfig, make_sampler, step_noise
from diffbody_jax.diffusion.schedule import NoiseSchedule
from tests.torch_ref import needs_torch, optional

torch = optional("torch")
diffusers = optional("diffusers")

SHAPE = (2, 8, 8, 4)


def _model_jax(params, z, t, cond):
    """A deterministic stand-in for a UNet: close to z (as a trained eps-model is at high noise), nonlinear in
    z, varying with t and the condition."""
    tt = t.astype(jnp.float32)[:, None, None, None]
    return 0.9 * z + 0.1 * jnp.tanh(z) * jnp.cos(tt / 300.0) + 0.05 * cond[:, None, None, :]


def _model_torch(z, t, cond):
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(z.shape[0], 1, 1, 1)
    return 0.9 * z + 0.1 * torch.tanh(z) * torch.cos(tt / 300.0) + 0.05 * cond[:, None, None, :]


def _reference(scheduler, z, cond, noises, steps, eta=None, **step_kwargs):
    """diffusers' loop over the same model (NHWC tensors: the schedulers are layout-agnostic)."""
    scheduler.set_timesteps(steps)
    z = torch.from_numpy(np.asarray(z))
    cond = torch.from_numpy(np.asarray(cond))
    zs, x0s = [], []
    for i, t in enumerate(scheduler.timesteps):
        out = _model_torch(z, t, cond)
        kw = dict(step_kwargs)
        if eta is not None:
            kw.update(eta=eta, variance_noise=torch.from_numpy(np.asarray(noises[i])))
        res = scheduler.step(out, t, z, **kw)
        z = res.prev_sample
        zs.append(z.numpy())
        x0s.append(res.pred_original_sample.numpy() if hasattr(res, "pred_original_sample") else None)
    return np.stack(zs), (None if x0s[0] is None else np.stack(x0s))


def _assert_trajectories_match(out, want_z, want_x0):
    """z after every step within 1e-5; x0 estimates within 1e-5 of their scale (at high noise x0 = (z - s eps) /
    sqrt(a) multiplies float32 rounding by 1 / sqrt(a), up to 15x)."""
    assert np.abs(np.asarray(out.trajectory) - want_z).max() <= 1e-5
    assert np.abs(np.asarray(out.sample) - want_z[-1]).max() <= 1e-5
    if want_x0 is None:
        return
    scale = np.abs(want_x0).max(axis=(1, 2, 3, 4), keepdims=True)
    assert (np.abs(np.asarray(out.x0_trajectory) - want_x0) / np.maximum(scale, 1.0)).max() <= 1e-5


@needs_torch
@pytest.mark.parametrize("prediction_type,variance_type,spacing", [
    ("epsilon", "fixed_small", "leading"), ("v_prediction", "fixed_small_log", "trailing"),
    ("epsilon", "fixed_small", "linspace")])
def test_ddpm_matches_diffusers_over_50_steps(monkeypatch, prediction_type, variance_type, spacing, rng):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
              variance_type=variance_type, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
              clip_sample=False)
    schedule = NoiseSchedule(**kw)
    key = jax.random.key(int(rng.integers(1 << 30)))
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    noises = [np.asarray(step_noise(key, i, SHAPE)) for i in range(50)]
    queue = iter(noises)
    # DDPMScheduler.step draws its noise itself: hand it ours, in step order.
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.from_numpy(next(queue).copy()))
    want_z, want_x0 = _reference(diffusers.DDPMScheduler(**kw), z_T, cond, noises, 50)

    out = make_sampler(_model_jax, schedule, SamplerConfig("ddpm", 50, return_trajectory=True))(key, z_T, cond)
    _assert_trajectories_match(out, want_z, want_x0)


@needs_torch
@pytest.mark.parametrize("eta,prediction_type", [(0.0, "epsilon"), (0.7, "v_prediction")])
def test_ddim_matches_diffusers_over_50_steps(eta, prediction_type, rng):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    key = jax.random.key(int(rng.integers(1 << 30)))
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    noises = [np.asarray(step_noise(key, i, SHAPE)) for i in range(50)]
    want_z, want_x0 = _reference(diffusers.DDIMScheduler(**kw), z_T, cond, noises, 50, eta=eta)
    out = make_sampler(_model_jax, NoiseSchedule(**kw), SamplerConfig("ddim", 50, eta=eta, return_trajectory=True))(
        key, z_T, cond)
    _assert_trajectories_match(out, want_z, want_x0)


@needs_torch
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_with_clip_sample_follows_diffusers(beta_schedule, use_clipped, rng):
    """clip_sample=True (DDIMScheduler's default): x0 is clipped; eps is re-derived from the clipped x0 only
    with use_clipped_model_output, as in diffusers. The stand-in model's x0 estimates exceed 1 at high noise."""
    kw = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
              clip_sample=True, set_alpha_to_one=True, steps_offset=0)
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    want_z, want_x0 = _reference(diffusers.DDIMScheduler(**kw), z_T, cond, None, 20,
                                 use_clipped_model_output=use_clipped)
    assert np.abs(want_x0).max() == pytest.approx(1.0)  # clipping is in play
    config = SamplerConfig("ddim", 20, use_clipped_model_output=use_clipped, return_trajectory=True)
    out = make_sampler(_model_jax, NoiseSchedule(**kw), config)(jax.random.key(0), z_T, cond)
    _assert_trajectories_match(out, want_z, want_x0)


def _saved_config(scheduler, tmp_path):
    scheduler.save_config(tmp_path)
    import json

    return json.loads((tmp_path / "scheduler_config.json").read_text())


@needs_torch
@pytest.mark.parametrize("name,method,kwargs", [
    ("DDPMScheduler", "ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                   variance_type="fixed_small_log", timestep_spacing="trailing", clip_sample=False)),
    ("DDIMScheduler", "ddim", dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
                                   clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading")),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", dict(beta_schedule="linear", beta_start=0.0002, beta_end=0.018,
                                                     prediction_type="v_prediction", timestep_spacing="trailing",
                                                     rescale_betas_zero_snr=False)),
])
def test_configs_that_diffusers_saves_load_and_match_its_trajectory(name, method, kwargs, tmp_path, rng, monkeypatch):
    """Each supported scheduler, saved by the installed diffusers with non-default settings, loads with
    `NoiseSchedule.from_dict` and our sampler follows the scheduler diffusers rebuilds from that file."""
    config = _saved_config(getattr(diffusers, name)(**kwargs), tmp_path)
    schedule = NoiseSchedule.from_dict(config, str(tmp_path / "scheduler_config.json"))
    reference = getattr(diffusers, name).from_config(config)
    key = jax.random.key(int(rng.integers(1 << 30)))
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    noises = [np.asarray(step_noise(key, i, SHAPE)) for i in range(25)]
    queue = iter(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.from_numpy(next(queue).copy()))
    want_z, want_x0 = _reference(reference, z_T, cond, noises, 25)
    out = make_sampler(_model_jax, schedule, SamplerConfig(method, 25, return_trajectory=True))(key, z_T, cond)
    _assert_trajectories_match(out, want_z, want_x0)


@needs_torch
@pytest.mark.parametrize("field,value", [("use_karras_sigmas", True), ("solver_order", 3),
                                         ("algorithm_type", "sde-dpmsolver++"), ("thresholding", True),
                                         ("final_sigmas_type", "sigma_min"), ("variance_type", "learned_range")])
def test_fields_that_would_change_the_math_are_refused_by_name(field, value, tmp_path):
    config = _saved_config(diffusers.DPMSolverMultistepScheduler(), tmp_path)
    config[field] = value
    with pytest.raises(ValueError, match=rf"^sched.json: .*{field}"):
        NoiseSchedule.from_dict(config, "sched.json")


@needs_torch
@pytest.mark.parametrize("prediction_type,spacing,steps", [
    ("epsilon", "linspace", 50), ("v_prediction", "leading", 50), ("epsilon", "trailing", 10)])
def test_dpmpp_2m_matches_diffusers(prediction_type, spacing, steps, rng):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
              timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    ref = diffusers.DPMSolverMultistepScheduler(**kw)
    want_z, _ = _reference(ref, z_T, cond, None, steps)
    schedule = NoiseSchedule(**kw)
    out = make_sampler(_model_jax, schedule, SamplerConfig("dpmpp_2m", steps, return_trajectory=True))(
        jax.random.key(0), z_T, cond)
    _assert_trajectories_match(out, want_z, None)


def test_compiled_once_and_one_loop(rng):
    traces = []

    def model(params, z, t, cond):
        traces.append(1)
        return _model_jax(params, z, t, cond)

    schedule = NoiseSchedule()
    sampler = make_sampler(model, schedule, SamplerConfig("ddpm", 50, cfg_scale=3.0))
    args = lambda: (jax.random.key(int(rng.integers(1 << 30))), rng.standard_normal(SHAPE).astype(np.float32),  # noqa: E731
                    rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32))
    sampler(*args())
    n = len(traces)
    sampler(*args())
    assert len(traces) == n, "a second call with new inputs of the same shape retraced"

    def program(steps):
        s = make_sampler(_model_jax, schedule, SamplerConfig("ddpm", steps))
        return s.lower(*args()[:3]).as_text()

    short, long = program(5), program(50)
    # One scan loop (the PRNG's own loops add the same few in both); the model appears once, not per step.
    assert short.count("stablehlo.while") == long.count("stablehlo.while") >= 1
    assert long.count("stablehlo.tanh") == short.count("stablehlo.tanh") == 1


def test_classifier_free_guidance_combines_the_two_passes(rng):
    schedule = NoiseSchedule()
    key = jax.random.key(3)
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond, uncond = rng.standard_normal((2, 2, 4)).astype(np.float32)
    guided = make_sampler(_model_jax, schedule, SamplerConfig("ddim", 10, cfg_scale=5.0))(key, z_T, cond, uncond)

    def combined(params, z, t, c):  # the guided model written out by hand
        return _model_jax(params, z, t, uncond) + 5.0 * (_model_jax(params, z, t, c) - _model_jax(params, z, t, uncond))

    by_hand = make_sampler(combined, schedule, SamplerConfig("ddim", 10))(key, z_T, cond)
    np.testing.assert_allclose(guided.sample, by_hand.sample, atol=1e-5)


def _quadratic_setup(rng):
    schedule = NoiseSchedule(prediction_type="epsilon")
    target = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    loss = lambda x0, t, aux: jnp.sum((x0 - aux) ** 2)  # noqa: E731
    return schedule, rng, target, loss


def test_gradient_guidance_moves_samples_toward_the_optimum_and_scale_zero_changes_nothing(rng):
    schedule, rng, target, loss = _quadratic_setup(rng)
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    key = jax.random.key(5)
    cfg = dict(method="ddpm", num_steps=20, return_trajectory=True)
    plain = make_sampler(_model_jax, schedule, SamplerConfig(**cfg))(key, z_T, cond)
    zero_cfg = SamplerConfig(**cfg, guidance_scale=0.0)
    zero = make_sampler(_model_jax, schedule, zero_cfg, loss)(key, z_T, cond, aux=target)
    np.testing.assert_array_equal(plain.sample, zero.sample)
    guided = make_sampler(_model_jax, schedule, SamplerConfig(**cfg, guidance_scale=0.05), loss)(
        key, z_T, cond, aux=target)
    dist = lambda x: float(jnp.mean((x - target) ** 2))  # noqa: E731
    assert dist(guided.x0_trajectory[-1]) < 0.5 * dist(plain.x0_trajectory[-1])
    windowed = make_sampler(_model_jax, schedule, SamplerConfig(**cfg, guidance_scale=0.05, guidance_start=0.3),
                            loss)(key, z_T, cond, aux=target)
    # Outside the window the path is the plain one; inside it moves toward the target.
    n_outside = int(np.sum(schedule.timesteps(20) / 1000 > 0.3))
    np.testing.assert_allclose(windowed.x0_trajectory[:n_outside], plain.x0_trajectory[:n_outside], atol=1e-5)
    assert dist(windowed.x0_trajectory[-1]) < dist(plain.x0_trajectory[-1])


def test_guidance_gradient_matches_finite_differences(rng):
    """The sampler subtracts s * d loss(x0_hat(z)) / dz, the gradient taken through the model."""
    from diffbody_jax.diffusion.schedule import predict_x0

    schedule, rng, target, loss = _quadratic_setup(rng)
    z = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    cond = jnp.asarray(rng.standard_normal((2, 4)).astype(np.float32))
    t = int(schedule.timesteps(2)[0])  # 501: the first of a 2-step DDIM run
    a = jnp.float32(schedule.alphas_cumprod()[t])

    def f(z):
        return loss(predict_x0(_model_jax(None, z, jnp.full((2,), t), cond), z, a, "epsilon"), t, target)

    grad = jax.grad(f)(z)

    def f64(z):  # the same loss in float64 numpy, for central differences without float32 cancellation
        out = 0.9 * z + 0.1 * np.tanh(z) * np.cos(t / 300.0) + 0.05 * np.asarray(cond, np.float64)[:, None, None, :]
        a64 = np.float64(a)
        return np.sum(((z - np.sqrt(1 - a64) * out) / np.sqrt(a64) - np.asarray(target, np.float64)) ** 2)

    z64, h = np.asarray(z, np.float64), 1e-5
    for idx in [(0, 1, 2, 3), (1, 7, 0, 0), (1, 3, 5, 2)]:
        e = np.zeros(SHAPE)
        e[idx] = h
        fd = (f64(z64 + e) - f64(z64 - e)) / (2 * h)
        assert abs(fd - float(grad[idx])) <= 1e-4 * max(1.0, abs(fd))

    key = jax.random.key(0)
    cfg = dict(method="ddim", num_steps=2, return_trajectory=True)
    plain = make_sampler(_model_jax, schedule, SamplerConfig(**cfg))(key, z, cond)
    guided_cfg = SamplerConfig(**cfg, guidance_scale=0.3)
    guided = make_sampler(_model_jax, schedule, guided_cfg, loss)(key, z, cond, aux=target)
    np.testing.assert_allclose(guided.trajectory[0], plain.trajectory[0] - 0.3 * grad, atol=1e-4, rtol=1e-5)


def test_same_key_same_samples_different_keys_differ(rng):
    schedule = NoiseSchedule()
    sampler = make_sampler(_model_jax, schedule, SamplerConfig("ddpm", 10))
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    a, b = sampler(jax.random.key(1), z_T, cond), sampler(jax.random.key(1), z_T, cond)
    np.testing.assert_array_equal(a.sample, b.sample)
    c = sampler(jax.random.key(2), z_T, cond)
    assert np.abs(np.asarray(a.sample) - np.asarray(c.sample)).mean() > 1e-3


def test_on_step_reports_every_step_in_order_and_changes_no_sample(rng):
    schedule = NoiseSchedule()
    seen = []
    hooked = make_sampler(_model_jax, schedule, SamplerConfig("ddim", 7), on_step=lambda i: seen.append(int(i)))
    plain = make_sampler(_model_jax, schedule, SamplerConfig("ddim", 7))
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    a = hooked(jax.random.key(0), z_T, cond).sample.block_until_ready()
    jax.effects_barrier()
    assert seen == list(range(7))
    np.testing.assert_array_equal(a, plain(jax.random.key(0), z_T, cond).sample)
    assert "callback" not in plain.lower(jax.random.key(0), z_T, cond).as_text()


def test_strength_starts_from_a_noised_latent(rng):
    schedule = NoiseSchedule()
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    out = make_sampler(_model_jax, schedule, SamplerConfig("ddim", 50, strength=0.3, return_trajectory=True))(
        jax.random.key(0), None, cond, x0_init=x0)
    assert out.x0_trajectory.shape[0] == 15  # int(50 * 0.3) steps from t = timesteps[35]
    with pytest.raises(ValueError, match="strength < 1 needs x0_init"):
        make_sampler(_model_jax, schedule, SamplerConfig("ddim", 50, strength=0.3))(jax.random.key(0), None, cond)


def test_guidance_through_a_vae_decoder_under_jit(rng):
    """Algorithm 1's shape: decode x0_hat with the VAE inside the guidance loss, all in the sampler's program."""
    from diffbody_jax.models.vae import AutoencoderKL, VAEConfig
    from tests.torch_ref import vae_diffusers_config

    vae = AutoencoderKL(VAEConfig.from_dict(vae_diffusers_config("tiny")))
    vae_params = vae.init_params(jax.random.key(0))
    image = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))

    def loss(x0, t, aux):
        decoded = vae.apply({"params": aux["vae"]}, x0, method=AutoencoderKL.decode_latents)
        return jnp.sum((decoded - aux["image"]) ** 2)

    schedule = NoiseSchedule()
    z_T = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, 4)).astype(np.float32)
    aux = {"vae": vae_params, "image": image}
    cfg = dict(method="ddim", num_steps=8, return_trajectory=True)
    plain = make_sampler(_model_jax, schedule, SamplerConfig(**cfg))(jax.random.key(1), z_T, cond)
    guided = make_sampler(_model_jax, schedule, SamplerConfig(**cfg, guidance_scale=0.02), loss)(
        jax.random.key(1), z_T, cond, aux=aux)
    assert float(loss(guided.x0_trajectory[-1], 0, aux)) < float(loss(plain.x0_trajectory[-1], 0, aux))


def test_params_are_arguments_not_constants_of_the_program():
    """The lowered sampler's HLO does not grow with the param size: params enter as arguments (a closed-over
    1 MB array used to add 2 MB of HLO text; at SDXL size that is gigabytes)."""
    schedule = NoiseSchedule()

    def model_fn(params, z, t, cond):
        return _model_jax(None, z, t, cond) + 1e-3 * jnp.mean(params["w"])

    sampler = make_sampler(model_fn, schedule, SamplerConfig("ddpm", 5))
    z = jnp.zeros(SHAPE)
    cond = jnp.zeros((2, 4))
    sizes = []
    for n in (16, 1 << 18):  # 64 B and 1 MB of float32
        params = {"w": jnp.full((n,), 0.5, jnp.float32)}
        sizes.append(len(sampler.lower(jax.random.key(0), z, cond, params=params).as_text()))
    assert abs(sizes[1] - sizes[0]) < 200, sizes
    out = sampler(jax.random.key(0), z, cond, params={"w": jnp.ones(8)})
    assert out.sample.shape == SHAPE
