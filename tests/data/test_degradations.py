"""Degradations: each operation does what it says, mixtures follow their lists, pipelines are seeded."""

import numpy as np
import pytest

from diffbody_jax.cli.config_args import load_config
from diffbody_jax.data import degradations as deg
from tests.torch_ref import REPO


@pytest.fixture(scope="module")
def photo():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()[:256, 128:384].astype(np.float32) / 255.0  # a face and shoulders


def _high_freq_energy(x):
    return float(np.mean(np.diff(x, axis=0) ** 2) + np.mean(np.diff(x, axis=1) ** 2))


def test_kernels_are_normalised_and_shaped():
    for k in [deg.gaussian_kernel(13, 2.0), deg.generalized_gaussian_kernel(15, 2, 1, 0.3, 0.7),
              deg.plateau_kernel(11, 1.5, 2.5, -1.0, 1.5), deg.sinc_kernel(13, np.pi / 3, pad_to=21)]:
        assert abs(float(k.sum()) - 1.0) < 1e-5
    iso = deg.gaussian_kernel(13, 2.0)
    np.testing.assert_allclose(iso, iso.T, atol=1e-7)
    np.testing.assert_allclose(iso, iso[::-1], atol=1e-7)
    assert iso.argmax() == 13 * 6 + 6
    # beta = 1 generalized Gaussian is the Gaussian; anisotropic with sigma_y > sigma_x spreads along y.
    np.testing.assert_allclose(deg.generalized_gaussian_kernel(13, 2, 2, 0, 1.0), iso, atol=1e-7)
    aniso = deg.gaussian_kernel(21, 1.0, 4.0)
    assert aniso[:, 10].sum() > 2 * aniso[10, :].sum()
    assert deg.sinc_kernel(13, np.pi / 3, pad_to=21).shape == (21, 21)
    assert deg.sinc_kernel(13, np.pi / 3).min() < 0  # ringing lobes


def test_blur_removes_high_frequencies_and_keeps_mean(photo):
    out = deg.blur(photo, deg.gaussian_kernel(13, 2.0))
    assert out.shape == photo.shape
    assert _high_freq_energy(out) < 0.2 * _high_freq_energy(photo)
    assert abs(float(out.mean() - photo.mean())) < 1e-3


def test_noise_has_the_stated_sigma(rng):
    grey = np.full((128, 128, 3), 0.5, np.float32)
    for sigma in (20.0, 40.0):
        noise = deg.gaussian_noise(grey, sigma, rng) - grey
        assert abs(noise.std() * 255 - sigma) < 0.03 * sigma
        assert abs(noise.mean()) * 255 < 1.0
    gray_noise = deg.gaussian_noise(grey, 20.0, rng, gray=True) - grey
    np.testing.assert_array_equal(gray_noise[..., 0], gray_noise[..., 2])
    colour_noise = deg.gaussian_noise(grey, 20.0, rng) - grey
    assert not np.allclose(colour_noise[..., 0], colour_noise[..., 2])
    small = deg.poisson_noise(grey, 0.5, rng) - grey
    large = deg.poisson_noise(grey, 2.0, rng) - grey
    assert 3.0 < large.std() / small.std() < 5.0


def test_jpeg_quality_lowers_psnr_monotonically(photo):
    scores = [deg.psnr(deg.jpeg(photo, q), photo) for q in (10, 30, 50, 70, 90)]
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] > 35 and scores[0] < 32
    assert deg.jpeg(photo[..., :1], 50).shape == photo[..., :1].shape


def test_resize_sizes(photo):
    assert deg.resize(photo, (64, 64)).shape == (64, 64, 3)
    assert deg.resize(photo[:250, :130], (62, 32), "area").shape == (62, 32, 3)
    with pytest.raises(ValueError, match="interpolation 'lanczos9'"):
        deg.resize(photo, (10, 10), "lanczos9")


@pytest.mark.parametrize("name", sorted(deg.TABLE1_MIXTURES))
def test_table1_mixtures(photo, name):
    mixture = deg.table1_mixture(name)
    a = mixture(photo, np.random.default_rng(7))
    b = mixture(photo, np.random.default_rng(7))
    np.testing.assert_array_equal(a.low_res, b.low_res)
    down = "down4" in name
    assert a.low_res.shape == ((64, 64, 3) if down else photo.shape)
    assert a.upsampled.shape == photo.shape
    np.testing.assert_array_equal(a.low_res, np.round(a.low_res * 255) / 255)  # 8-bit levels
    assert deg.psnr(a.upsampled, photo) < 30
    if "noise" in name:
        c = mixture(photo, np.random.default_rng(8))
        assert np.abs(a.low_res - c.low_res).max() > 0.1
    ops = [op.kind for op in mixture.ops]
    assert ops == [k for k in ("blur", "noise", "resize", "jpeg") if k in ops]  # the stated order


def test_mixture_ops_are_those_of_the_paper():
    mixes = {name: deg.table1_mixture(name).ops for name in deg.TABLE1_MIXTURES}
    assert mixes["blur2-noise20-down4-jpeg50"] == (
        deg.Op("blur", sigma=2.0, kernel_size=13), deg.Op("noise", sigma=20.0),
        deg.Op("resize", scale=0.25, interpolation="bicubic"), deg.Op("jpeg", quality=50))
    assert [op.kind for op in mixes["blur2-noise40"]] == ["blur", "noise"]
    with pytest.raises(ValueError, match="odd kernel_size"):
        deg.Op("blur", sigma=2.0, kernel_size=12)


def test_real_esrgan_is_seeded_and_sized(photo):
    pipeline = deg.degradation_from_config(load_config(f"{REPO}/configs/degradation.py"))
    assert isinstance(pipeline, deg.RealESRGANDegradation)
    outs = [pipeline(photo, np.random.default_rng(seed)) for seed in (0, 0, 1, 2)]
    np.testing.assert_array_equal(outs[0].low_res, outs[1].low_res)
    assert np.abs(outs[0].low_res - outs[2].low_res).max() > 0.05
    for out in outs:
        assert out.low_res.shape == (64, 64, 3) and out.upsampled.shape == photo.shape
        assert 0.0 <= out.low_res.min() and out.low_res.max() <= 1.0
        assert deg.psnr(out.upsampled, photo) < 32
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        pipeline(photo[:30], np.random.default_rng(0))


def test_config_builds_each_mixture():
    for name in deg.TABLE1_MIXTURES:
        built = deg.degradation_from_config(load_config(f"{REPO}/configs/degradation.py:kind={name}"))
        assert built == deg.table1_mixture(name)
