"""SwinIR: parity with the official definition (spandrel's copy), every head, any size, checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.swinir import swinir_from_state_dict, swinir_state_dict
from diffbody_jax.models.swinir import (
    SwinIR,
    SwinIRConfig,
    pixel_shuffle,
    pixel_unshuffle,
    swinir_restore,
)
from tests.torch_ref import nchw_to_nhwc, nhwc_to_nchw, randomize_, spandrel_swinir_class, state_dict_numpy

torch = pytest.importorskip("torch")
try:
    spandrel_swinir_class()
except ImportError as e:
    pytest.skip(f"spandrel is needed for the reference: {e}", allow_module_level=True)

TOL = 1e-4
TINY = dict(img_size=16, embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4, mlp_ratio=2.0)

CASES = {
    "denoise": dict(TINY, upsampler="", upscale=1),
    "pixelshuffle-x2": dict(TINY, upsampler="pixelshuffle", upscale=2),
    "pixelshuffle-x3-3conv": dict(TINY, upsampler="pixelshuffle", upscale=3, resi_connection="3conv"),
    "pixelshuffledirect-x3": dict(TINY, upsampler="pixelshuffledirect", upscale=3, img_range=255.0),
    "nearest+conv-x4-ape": dict(TINY, upsampler="nearest+conv", upscale=4, ape=True),
    "nearest+conv-x2-gray": dict(TINY, upsampler="nearest+conv", upscale=2, in_chans=1, qkv_bias=False),
}


def _reference(config: SwinIRConfig, seed: int):
    fields = config.to_dict()
    del fields["_class_name"]
    fields["start_unshuffle"] = fields.pop("unshuffle_scale")
    ref = spandrel_swinir_class()(**fields).eval()
    randomize_(ref, seed)
    return ref


def _run_ref(ref, x_nhwc):
    with torch.no_grad():
        return nchw_to_nhwc(ref(torch.from_numpy(nhwc_to_nchw(x_nhwc))).numpy())


@functools.cache
def _apply(config: SwinIRConfig):
    return jax.jit(lambda p, x: SwinIR(config).apply({"params": p}, x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_official(name, rng):
    config = SwinIRConfig(**CASES[name])
    ref = _reference(config, seed=len(name))
    params = swinir_from_state_dict(state_dict_numpy(ref), config, name)
    # One size on the window grid and one that needs reflect padding and a crop back.
    for size in [(16, 16), (13, 18)] if not config.ape else [(16, 16)]:
        x = rng.uniform(0, 1, (2, *size, config.in_chans)).astype(np.float32)
        want = _run_ref(ref, x)
        got = np.asarray(_apply(config)(params, x))
        assert got.shape == (2, size[0] * config.upscale, size[1] * config.upscale, config.in_chans)
        assert want.std() > 0.05
        assert np.abs(got - want).max() <= TOL * max(1.0, config.img_range)


def test_diffbir_variant_parity(rng):
    """Pixel-unshuffle in, nearest+conv x4 out: the output has the input's size; DiffBIR key layout."""
    config = SwinIRConfig(**dict(TINY, upsampler="nearest+conv", upscale=4, unshuffle_scale=4))
    ref = _reference(config, seed=3)
    state = state_dict_numpy(ref)
    state = {k.replace("conv_first.", "conv_first.1.", 1): v for k, v in state.items()}  # DiffBIR's names
    state = {f"module.{k}": v for k, v in state.items()}  # as a DDP-trained DiffBIR checkpoint stores them
    params = swinir_from_state_dict(state, config, "diffbir")
    x = rng.uniform(0, 1, (1, 32, 48, 3)).astype(np.float32)
    got = np.asarray(_apply(config)(params, x))
    assert got.shape == x.shape
    assert np.abs(got - _run_ref(ref, x)).max() <= TOL
    assert "conv_first.1.weight" in swinir_state_dict(config, params)


def test_any_size_and_small_images(rng):
    config = SwinIRConfig(**dict(TINY, upsampler="nearest+conv", upscale=4, unshuffle_scale=4))
    params = SwinIR(config).init_params(jax.random.key(0))
    for size in [(17, 50), (5, 3)]:
        x = rng.uniform(0, 1, (1, *size, 3)).astype(np.float32)
        out = jax.jit(functools.partial(swinir_restore, SwinIR(config)))(params, jnp.asarray(x[0]))
        assert out.shape == (*size, 3)
        assert np.isfinite(np.asarray(out)).all() and float(np.std(out)) > 0


def test_pixel_shuffle_matches_torch(rng):
    x = rng.standard_normal((2, 18, 5, 4)).astype(np.float32)
    want = torch.nn.functional.pixel_shuffle(torch.from_numpy(x), 3).numpy()
    np.testing.assert_array_equal(nhwc_to_nchw(pixel_shuffle(nchw_to_nhwc(x), 3)), want)
    back = pixel_unshuffle(pixel_shuffle(jnp.asarray(nchw_to_nhwc(x)), 3), 3)
    np.testing.assert_array_equal(back, nchw_to_nhwc(x))


def test_window_attention_runs_on_any_registered_backend(rng):
    """The window attention (relative position bias + shifted-window mask as an additive bias) through the
    shared backends gives the einsum backend's output."""
    config = SwinIRConfig(**dict(TINY, upsampler="", upscale=1))
    params = SwinIR(config).init_params(jax.random.key(0))
    x = jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 3)), jnp.float32)
    want = SwinIR(config).apply({"params": params}, x)
    for backend in ("xla", "chunked"):
        got = SwinIR(config, attention_backend=backend).apply({"params": params}, x)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5, backend
