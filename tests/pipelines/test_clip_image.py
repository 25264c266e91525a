"""CLIP image preprocessing against transformers' CLIPImageProcessor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.pipelines.clip_image import clip_preprocess

transformers = pytest.importorskip("transformers")


def _photo_like(h, w, seed=None):
    """Smooth colour gradients plus mild noise: resampling filters agree on such images as on photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(rng.uniform(2, 6) * yy + rng.uniform(2, 6) * xx + rng.uniform(0, 6)) for _ in range(3)]
    img = (np.stack(chans, -1) * 0.4 + 0.5 + rng.normal(0, 0.02, (h, w, 3))) * 255
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(300, 400), (512, 256), (224, 224)])
def test_matches_clip_image_processor(h, w):
    proc = transformers.CLIPImageProcessor()  # the defaults: resize 224 bicubic, crop 224, CLIP mean/std
    img = _photo_like(h, w)
    want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(jax.jit(clip_preprocess)(jnp.asarray(img[None])))[0]
    assert got.shape == want.shape == (224, 224, 3)
    err = np.abs(got - want)
    # Measured over 8 images: mean 0.0041-0.0045, max 0.0146-0.0163 in normalised units, i.e. about one
    # uint8 step (1/255/std = 0.015): PIL rounds its resized image to uint8. 224x224 inputs: exact.
    assert err.mean() <= 0.01 and err.max() <= 0.03, (err.mean(), err.max())


def test_float_and_uint8_inputs_agree():
    img = _photo_like(256, 320)
    a = clip_preprocess(jnp.asarray(img[None]))
    b = clip_preprocess(jnp.asarray(img[None], jnp.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_colour_adapter_features_are_the_penultimate_hidden_states():
    from diffbody_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
    from diffbody_jax.pipelines.clip_image import clip_preprocess, colour_adapter_features

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=28, patch_size=7)
    vision = CLIPVisionModel(cfg)
    params = vision.init_params(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (2, 40, 30, 3))
    got = colour_adapter_features(vision, params, images)
    out = vision.apply({"params": params}, clip_preprocess(images, 28, 28))
    assert got.shape == (2, 1 + 16, 32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(out["hidden_states"][-2]))
    assert not np.allclose(np.asarray(got), np.asarray(out["last_hidden_state"]))
