"""Training losses against the PyTorch formulas (diffusers' schedulers and training scripts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.diffusion.losses import body_attention_loss, diffusion_loss, multi_branch_loss, noising
from diffbody_jax.diffusion.schedule import NoiseSchedule
from tests.torch_ref import needs_torch, optional

torch = optional("torch")
diffusers = optional("diffusers")

SCHEDULE = NoiseSchedule()
ALPHAS = jnp.asarray(SCHEDULE.alphas_cumprod())


def _draw(rng, shape=(3, 8, 6, 4)):
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


@needs_torch
def test_noising_matches_diffusers_add_noise_and_offsets_per_channel(rng):
    x0 = rng.standard_normal((3, 8, 6, 4)).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    t, eps, z = noising(key, jnp.asarray(x0), ALPHAS)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(np.array(eps)), torch.from_numpy(np.array(t)))
    np.testing.assert_allclose(z, want.numpy(), atol=1e-6)
    _, eps_off, _ = noising(key, jnp.asarray(x0), ALPHAS, noise_offset=0.1)
    shift = np.asarray(eps_off - eps)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)
    assert np.abs(shift).max() > 1e-3


def test_body_attention_loss_is_eq4_as_written(rng):
    """Seed 000 Eq. 4, ||(1 + I_attn) * (eps - eps_theta)||^2, in float64 numpy: the factor inside the square."""
    pred, x0, eps = _draw(rng)
    attn = rng.uniform(0, 1, (3, 8, 6, 1))
    t = rng.integers(0, 1000, 3)
    residual = (1.0 + attn) * (eps.astype(np.float64) - pred.astype(np.float64))
    want = np.sum(residual**2) / residual.size
    got = body_attention_loss(pred, x0, eps, ALPHAS[t], "epsilon", attn.astype(np.float32))
    assert abs(float(got) - want) <= 1e-6 * want
    # the weight reaches 4 where I_attn = 1: a pixel's error counts four times, not twice
    one_pixel = np.zeros_like(pred)
    one_pixel[0, 2, 3, 1] = 1.0
    full = np.zeros((3, 8, 6, 1), np.float32)
    full[0, 2, 3, 0] = 1.0
    ratio = body_attention_loss(one_pixel, x0, np.zeros_like(eps), ALPHAS[t], "epsilon", full) / diffusion_loss(
        one_pixel, x0, np.zeros_like(eps), ALPHAS[t], "epsilon")
    assert float(ratio) == pytest.approx(4.0, rel=1e-6)
    linear = np.sum((1.0 + attn) * (eps.astype(np.float64) - pred) ** 2) / residual.size
    got_linear = body_attention_loss(pred, x0, eps, ALPHAS[t], "epsilon", attn.astype(np.float32), weighting="linear")
    assert abs(float(got_linear) - linear) <= 1e-6 * linear
    with pytest.raises(ValueError, match="weighting='cubic'"):
        body_attention_loss(pred, x0, eps, ALPHAS[t], "epsilon", attn, weighting="cubic")


@needs_torch
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weight_map_loss_matches_torch(prediction_type, rng):
    """A per-pixel weight on the squared error, against the PyTorch expression with diffusers' v target."""
    pred, x0, eps = _draw(rng)
    attn = rng.uniform(0, 1, (3, 8, 6, 1)).astype(np.float32)
    t = rng.integers(0, 1000, 3)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
    tt = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    tgt = tt(eps) if prediction_type == "epsilon" else ref.get_velocity(tt(x0), tt(eps), torch.from_numpy(t))
    want = (((tt(pred) - tgt) ** 2) * (1 + tt(attn))).mean().item()
    got = diffusion_loss(pred, x0, eps, ALPHAS[t], prediction_type, weight_map=1 + attn)
    assert abs(float(got) - want) <= 1e-6 * max(1.0, abs(want))
    plain = diffusion_loss(pred, x0, eps, ALPHAS[t], prediction_type)
    ones = diffusion_loss(pred, x0, eps, ALPHAS[t], prediction_type, weight_map=np.ones_like(attn))
    assert float(plain) == pytest.approx(float(ones), rel=1e-6)
    with pytest.raises(ValueError, match=r"weight_map: shape \(3, 4, 3, 1\) does not fit the latents \(3, 8, 6, 4\)"):
        diffusion_loss(pred, x0, eps, ALPHAS[t], prediction_type, weight_map=attn[:, ::2, ::2])


@needs_torch
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_matches_diffusers_training_scripts(prediction_type, rng):
    from diffusers.training_utils import compute_snr

    pred, x0, eps = _draw(rng)
    t = np.array([3, 400, 990])
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
    snr = compute_snr(ref, torch.from_numpy(t))
    weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    tt = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    tgt = tt(eps) if prediction_type == "epsilon" else ref.get_velocity(tt(x0), tt(eps), torch.from_numpy(t))
    per = torch.nn.functional.mse_loss(tt(pred), tgt, reduction="none").mean(dim=(1, 2, 3))
    want = (per * weights).mean().item()
    got = diffusion_loss(pred, x0, eps, ALPHAS[t], prediction_type, min_snr_gamma=5.0)
    assert abs(float(got) - want) <= 1e-5 * abs(want)


def test_multi_branch_loss_sums_branch_losses(rng):
    xs, es, preds = _draw(rng), _draw(rng), _draw(rng)
    a = ALPHAS[np.array([10, 500, 900])]
    total, parts = multi_branch_loss(np.concatenate(preds, -1), xs, es, a, "v_prediction")
    singles = [diffusion_loss(p, x, e, a, "v_prediction") for p, x, e in zip(preds, xs, es, strict=True)]
    np.testing.assert_allclose([parts[f"branch_{b}"] for b in range(3)], singles, rtol=1e-6)
    assert float(total) == pytest.approx(sum(float(s) for s in singles), rel=1e-6)
    weighted, _ = multi_branch_loss(np.concatenate(preds, -1), xs, es, a, "v_prediction", branch_weights=(1, 0, 2))
    assert float(weighted) == pytest.approx(float(singles[0] + 2 * singles[2]), rel=1e-6)
