"""CLIP image preprocessing against transformers' CLIPImageProcessor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.conditioning.clip_image import CLIP_MEAN, CLIP_STD, clip_preprocess, resolve_fit
from tests.torch_ref import needs_torch, optional

transformers = optional("transformers")


def _photo_like(h, w, seed):
    """Smooth colour gradients plus mild noise: resampling filters agree on such images as on photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(rng.uniform(2, 6) * yy + rng.uniform(2, 6) * xx + rng.uniform(0, 6)) for _ in range(3)]
    img = (np.stack(chans, -1) * 0.4 + 0.5 + rng.normal(0, 0.02, (h, w, 3))) * 255
    return np.clip(img, 0, 255).astype(np.uint8)


@needs_torch
@pytest.mark.parametrize("h,w", [(300, 400), (512, 256), (224, 224)])
def test_matches_clip_image_processor(h, w, seed):
    proc = transformers.CLIPImageProcessor()  # the defaults: resize 224 bicubic, crop 224, CLIP mean/std
    img = _photo_like(h, w, seed)
    want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(jax.jit(clip_preprocess)(jnp.asarray(img[None])))[0]
    assert got.shape == want.shape == (224, 224, 3)
    err = np.abs(got - want)
    # Measured over 8 images: mean 0.0041-0.0045, max 0.0146-0.0163 in normalised units, i.e. about one
    # uint8 step (1/255/std = 0.015): PIL rounds its resized image to uint8. 224x224 inputs: exact.
    assert err.mean() <= 0.01 and err.max() <= 0.03, (err.mean(), err.max())


def test_float_and_uint8_inputs_agree(seed):
    img = _photo_like(256, 320, seed)
    a = clip_preprocess(jnp.asarray(img[None]))
    b = clip_preprocess(jnp.asarray(img[None], jnp.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _pad_square_numpy(img):
    """Pad an HWC uint8 image to a square with CLIP's mean colour (rounded to uint8), centred."""
    h, w, _ = img.shape
    s = max(h, w)
    out = np.empty((s, s, 3), np.uint8)
    out[:] = np.round(np.asarray(CLIP_MEAN) * 255).astype(np.uint8)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
    return out


@needs_torch
@pytest.mark.parametrize("h,w", [(512, 256), (200, 480)])
def test_pad_to_square_matches_clip_image_processor_on_the_padded_image(h, w, seed):
    """fit="pad": CLIPImageProcessor on the image padded to a square in numpy is the reference."""
    proc = transformers.CLIPImageProcessor()
    img = _photo_like(h, w, seed)
    want = proc(images=_pad_square_numpy(img), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(jax.jit(lambda x: clip_preprocess(x, fit="pad"))(jnp.asarray(img[None])))[0]
    err = np.abs(got - want)
    # the same bound as the crop path; the border adds the mean colour's rounding to uint8 (< 0.008)
    assert err.mean() <= 0.01 and err.max() <= 0.03, (err.mean(), err.max())


def test_auto_fit_keeps_head_and_feet_of_a_2_to_1_image():
    """A 2:1 full-body image with bright head and feet bands: "auto" pads it (the bands stay in the CLIP input),
    a centre crop cuts them off; a near-square image is still centre-cropped."""
    img = np.full((512, 256, 3), 128, np.uint8)
    img[:32], img[-32:] = 255, 255  # head, feet
    crop = np.asarray(clip_preprocess(jnp.asarray(img[None]), fit="center_crop"))[0]
    auto = np.asarray(clip_preprocess(jnp.asarray(img[None]), fit="auto"))[0]
    white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    # rows whose middle (the body's columns in both fits) is white
    rows = lambda x: np.sum(np.all(np.abs(x[:, 70:154] - white) < 0.05, axis=(1, 2)))  # noqa: E731
    assert rows(crop) == 0
    assert rows(auto) >= 2 * 10  # 32 of 512 rows at each end -> 14 of 224 rows, less the filter's blur
    assert resolve_fit("auto", 512, 256) == "pad" and resolve_fit("auto", 300, 320) == "center_crop"
    with pytest.raises(ValueError, match="fit='stretch'"):
        resolve_fit("stretch", 1, 1)


@needs_torch
def test_colour_adapter_features_are_clip_vision_penultimate_states(rng):
    """Our CLIP tower on our preprocessed pixels against transformers' CLIPVisionModel on the same pixels."""
    import torch

    from diffbody_jax.conditioning.clip_image import colour_adapter_features
    from diffbody_jax.interop.clip import clip_vision_table
    from diffbody_jax.interop.mapping import torch_to_flax
    from diffbody_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
    from tests.torch_ref import randomize_, state_dict_numpy

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=28, patch_size=7)
    ref = transformers.CLIPVisionModel(cfg).eval()
    randomize_(ref, seed=int(rng.integers(1 << 30)))
    vision = CLIPVisionModel(
        CLIPVisionConfig.from_dict({**cfg.to_dict(), "architectures": ["CLIPVisionModel"]}))
    params = torch_to_flax(state_dict_numpy(ref), clip_vision_table(vision.config), vision.param_shapes(), "vision")
    images = jnp.asarray(rng.uniform(0, 1, (2, 56, 28, 3)).astype(np.float32))
    for fit in ("auto", "center_crop"):
        got = np.asarray(colour_adapter_features(vision, params, images, fit=fit))
        pixels = np.asarray(clip_preprocess(images, 28, 28, fit=fit)).transpose(0, 3, 1, 2)
        with torch.no_grad():
            want = ref(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2].numpy()
        assert got.shape == (2, 1 + 16, 32)
        assert np.abs(got - want).max() <= 1e-4
