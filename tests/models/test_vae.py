"""AutoencoderKL: parity with diffusers, scaling, tiling, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.interop.vae import vae_table
from diffbody_jax.models.vae import AutoencoderKL, VAEConfig, decode_tiled, encode_tiled
from tests.torch_ref import (
    nchw_to_nhwc,
    needs_torch,
    nhwc_to_nchw,
    optional,
    randomize_,
    state_dict_numpy,
    vae_diffusers_config,
)

torch = optional("torch")
diffusers = optional("diffusers")

TOL = 1e-4


def _pair(variant, seed=0):
    ref = diffusers.AutoencoderKL(**vae_diffusers_config(variant)).eval()
    randomize_(ref, seed)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    params = torch_to_flax(state_dict_numpy(ref), vae_table(ours.config), ours.param_shapes(), variant)
    return ref, ours, params


@needs_torch
@pytest.mark.parametrize("variant,size", [("tiny", (16, 16)), ("tiny3", (24, 16))])
def test_encode_decode_parity(variant, size, rng):
    ref, ours, params = _pair(variant)
    x = rng.uniform(-1, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        want_mean, want_logvar = post.mean.numpy(), post.logvar.numpy()
    got = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=AutoencoderKL.encode))(params, nchw_to_nhwc(x))
    assert np.abs(nhwc_to_nchw(got.mean) - want_mean).max() <= TOL
    assert np.abs(nhwc_to_nchw(got.logvar) - want_logvar).max() <= TOL

    z = rng.standard_normal(want_mean.shape).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy()
    out = jax.jit(lambda p, z: ours.apply({"params": p}, z, method=AutoencoderKL.decode))(params, nchw_to_nhwc(z))
    assert want.std() > 0.1
    assert np.abs(nhwc_to_nchw(out) - want).max() <= TOL


@needs_torch
def test_latent_scaling_and_sampling(rng):
    _, ours, params = _pair("tiny3", seed=1)
    c = ours.config
    x = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    post = ours.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = ours.apply({"params": params}, x, method=AutoencoderKL.encode_latents)
    np.testing.assert_allclose(z, (post.mean - c.shift_factor) * c.scaling_factor, atol=1e-6)
    # decode_latents undoes the scaling
    a = ours.apply({"params": params}, z, method=AutoencoderKL.decode_latents)
    b = ours.apply({"params": params}, post.mean, method=AutoencoderKL.decode)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # sampling draws around the mean with the posterior's std, deterministically per key
    s1 = ours.apply({"params": params}, x, jax.random.key(3), method=AutoencoderKL.encode_latents)
    s2 = ours.apply({"params": params}, x, jax.random.key(3), method=AutoencoderKL.encode_latents)
    np.testing.assert_array_equal(s1, s2)
    assert np.abs(np.asarray(s1) - np.asarray(z)).max() > 0


def _smooth_latent(rng, h, w, c=4, period=8.0):
    """Plane waves of an 8-pixel period in random directions (drawn from `rng`): smooth and spatially stationary."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = [np.sin(2 * np.pi * (np.cos(a) * yy + np.sin(a) * xx) / period + ph) for a, ph in rng.uniform(0, 3, (c, 2))]
    return np.stack(waves, -1)[None].astype(np.float32)


def test_tiling_is_exact_for_local_operations(rng):
    """The tile/blend machinery itself: for a function whose receptive field is smaller than the
    discarded tile margin, tiled equals untiled everywhere (borders included)."""
    from diffbody_jax.models.tiling import tiled_map as _tiled

    x = jnp.asarray(rng.standard_normal((2, 24, 40, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)

    def conv_up(t):  # 3x3 conv then nearest x2: corrupts one pixel at each tile edge
        y = jax.lax.conv_general_dilated(t, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)

    np.testing.assert_allclose(np.asarray(decode := _tiled(conv_up, x, 16, 6, 2.0)), np.asarray(conv_up(x)), atol=1e-5)
    assert decode.shape == (2, 48, 80, 5)


@needs_torch
def test_tiled_decode_close_to_untiled_on_a_smooth_latent(rng):
    """GroupNorm statistics and the mid-block attention are computed per tile (as in diffusers'
    tiled decode), so a tiled decode cannot equal the untiled one exactly. Measured at 64-latent tiles
    with 16 of overlap over 200 fresh latents, as multiples of the output's std: mean abs error median
    0.018 (worst 0.198), 99th percentile median 0.073 (worst 0.93), max median 0.15 (worst 3.2: the
    tail is long, so the max is not bounded). Bounds: mean <= 0.3, 99th percentile <= 1.5.
    Seams are not checked here: on this smooth latent a hard cut between tiles shows the same column
    jumps as the blend (measured), so the blend is checked where a cut would show, in
    test_the_blend_has_no_step_where_tiles_disagree."""
    _, ours, params = _pair("tiny", seed=2)
    z = jnp.asarray(_smooth_latent(rng, 96, 128))
    full = np.asarray(ours.apply({"params": params}, z, method=AutoencoderKL.decode))
    tiled = np.asarray(jax.jit(lambda p, z: decode_tiled(ours, p, z, tile=64, overlap=16))(params, z))
    assert tiled.shape == full.shape == (1, 192, 256, 3)
    err = np.abs(tiled - full)[:, 8:-8, 8:-8] / full.std()  # away from the image border
    assert err.mean() <= 0.3, err.mean()
    assert np.quantile(err, 0.99) <= 1.5, np.quantile(err, 0.99)


def test_the_blend_has_no_step_where_tiles_disagree(rng):
    """A function that shifts each tile by its own mean makes neighbouring tiles disagree by a known amount (the
    input ramps up from left to right); the blend must spread that disagreement over the overlap instead of
    cutting at one column. With a 32-pixel overlap (its outer quarter at weight 0: a 25-pixel ramp) no step between
    neighbouring columns of the blended shift may exceed 1/8 of the largest disagreement between horizontal
    neighbours. Checked to fail for a hard cut (a step of all of it) and for a 4-pixel ramp (a fifth of it)."""
    from diffbody_jax.models.tiling import tile_starts, tiled_map

    h, w, tile, overlap = 160, 224, 64, 32
    x = rng.uniform(-1, 1, (1, h, w, 1)) + np.linspace(0, 4, w)[None, None, :, None]
    shifted = np.asarray(jax.jit(lambda x: tiled_map(lambda t: t + t.mean(), x, tile, overlap, 1.0))(
        jnp.asarray(x, jnp.float32))) - x
    means = np.array([[x[:, y:y + tile, c:c + tile].mean() for c in tile_starts(w, tile, overlap)]
                      for y in tile_starts(h, tile, overlap)])
    disagreement = np.abs(np.diff(means, axis=1)).max()
    assert disagreement > 0.3, disagreement  # the tiles really disagree
    step = np.abs(np.diff(shifted, axis=2)).max()
    assert step <= disagreement / 8, (step, disagreement)


@needs_torch
def test_tiled_encode_close_to_untiled(rng):
    """Measured over 60 fresh images: mean abs error of the posterior mean median 0.032 x its std
    (worst 0.20), max median 0.28 x std (worst 0.99): the tail is long, as per-tile GroupNorm statistics
    drift on images whose content differs between tiles. Bounds: mean <= 0.3 x std, max <= 2 x std."""
    _, ours, params = _pair("tiny", seed=4)
    x = jnp.asarray(np.tanh(_smooth_latent(rng, 128, 192, c=3)))
    full = ours.apply({"params": params}, x, method=AutoencoderKL.encode)
    tiled = jax.jit(lambda p, x: encode_tiled(ours, p, x, tile=64, overlap=16))(params, x)
    assert tiled.mean.shape == full.mean.shape == (1, 64, 96, 4)
    err = np.abs(np.asarray(tiled.mean) - np.asarray(full.mean))[:, 4:-4, 4:-4]
    std = float(np.std(full.mean))
    assert err.mean() <= 0.3 * std and err.max() <= 2.0 * std, (err.mean(), err.max(), std)
    with pytest.raises(ValueError, match="multiples of the VAE factor 2"):
        encode_tiled(ours, params, x, tile=33, overlap=12)


@needs_torch
def test_bf16_decode_stays_finite_where_fp16_overflows(rng):
    """Scale the decoder's last up block so activations exceed fp16's 65504, as the SDXL VAE's do.

    PyTorch in fp16 returns inf/nan there; bf16 has float32's exponent range, so ours stays finite and
    close to fp32 relative to the output's scale.
    """
    ref, ours, params = _pair("tiny", seed=5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("decoder.up_blocks.1.resnets.1.conv2"):
                p.mul_(3e4)
    params = torch_to_flax(state_dict_numpy(ref), vae_table(ours.config), ours.param_shapes(), "scaled")
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        fp16 = ref.half().decode(torch.from_numpy(z).half()).sample.float().numpy()
    assert not np.isfinite(fp16).all()
    fp32 = np.asarray(ours.apply({"params": params}, nchw_to_nhwc(z), method=AutoencoderKL.decode))
    bf16 = AutoencoderKL(ours.config, dtype=jnp.bfloat16)
    got = np.asarray(bf16.apply({"params": params}, nchw_to_nhwc(z), method=AutoencoderKL.decode), np.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - fp32).max() <= 0.05 * np.abs(fp32).max()
