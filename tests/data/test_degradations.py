"""Degradations: each operation does what it says, mixtures follow their lists, pipelines are seeded."""

import numpy as np
import pytest

from diffbody_jax.config import load_config
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


# Table 1 of seed 002 as the paper states each mixture, written out here (not read from the module): blur
# sigma, noise sigma (0-255), scale factor, JPEG quality; None where the mixture has no such operation.
PAPER_TABLE1 = {
    "blur2-down4": dict(blur=2.0, noise=None, down=4, jpeg=None),
    "noise40-down4": dict(blur=None, noise=40.0, down=4, jpeg=None),
    "blur2-noise40": dict(blur=2.0, noise=40.0, down=None, jpeg=None),
    "blur2-noise40-down4": dict(blur=2.0, noise=40.0, down=4, jpeg=None),
    "blur2-noise20-down4-jpeg50": dict(blur=2.0, noise=20.0, down=4, jpeg=50),
}
# The classical degradation model y = JPEG((x * k) down_s + n): the order every mixture follows.
CLASSICAL_ORDER = ("blur", "resize", "noise", "jpeg")


def _mixture_params(mixture):
    ops = {op.kind: op for op in mixture.ops}
    return dict(blur=ops["blur"].sigma if "blur" in ops else None,
                noise=ops["noise"].sigma if "noise" in ops else None,
                down=round(1 / ops["resize"].scale) if "resize" in ops else None,
                jpeg=ops["jpeg"].quality if "jpeg" in ops else None)


def test_all_five_table1_mixtures_have_the_papers_parameters_and_the_classical_order():
    assert sorted(deg.TABLE1_MIXTURES) == sorted(PAPER_TABLE1)
    for name, want in PAPER_TABLE1.items():
        mixture = deg.table1_mixture(name)
        assert _mixture_params(mixture) == want, name
        kinds = [op.kind for op in mixture.ops]
        assert kinds == [k for k in CLASSICAL_ORDER if k in kinds], (name, kinds)
        for op in mixture.ops:
            if op.kind == "blur":
                assert op.kernel_size == 13  # 2 * ceil(3 * 2) + 1, our stated choice
            if op.kind == "resize":
                assert op.interpolation == "bicubic"
            if op.kind == "noise":
                assert not op.gray


@pytest.mark.parametrize("name", [n for n, p in PAPER_TABLE1.items() if p["noise"] and not p["jpeg"]])
def test_noise_std_at_low_resolution_is_the_stated_sigma(name):
    """On a flat grey image (blur and resize leave it flat) the degraded image's deviation from grey is the
    added noise (plus 8-bit rounding, std 0.29/255): its std must be sigma/255 within 3%."""
    grey = np.full((512, 512, 3), 0.5, np.float32)
    out = deg.table1_mixture(name)(grey, np.random.default_rng(11))
    sigma = PAPER_TABLE1[name]["noise"]
    measured = float(np.std(out.low_res.astype(np.float64) - 0.5)) * 255
    expected = float(np.hypot(sigma, 1 / np.sqrt(12)))
    assert abs(measured - expected) <= 0.03 * expected, (measured, sigma)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE1))
def test_table1_mixtures_are_seeded_and_sized(photo, name):
    mixture = deg.table1_mixture(name)
    a = mixture(photo, np.random.default_rng(7))
    b = mixture(photo, np.random.default_rng(7))
    np.testing.assert_array_equal(a.low_res, b.low_res)
    down = PAPER_TABLE1[name]["down"] or 1
    assert a.low_res.shape == (256 // down, 256 // down, 3)
    assert a.upsampled.shape == photo.shape
    # the degraded image is the photo's: closer to its bicubic downsample than to another photo's
    reference = deg.resize(photo, a.low_res.shape[:2], "bicubic")
    assert deg.psnr(a.low_res, reference) > deg.psnr(a.low_res, reference[::-1]) + 3
    if PAPER_TABLE1[name]["noise"]:
        c = mixture(photo, np.random.default_rng(8))
        assert np.abs(a.low_res - c.low_res).max() > 0.1


def test_op_validation():
    with pytest.raises(ValueError, match="odd kernel_size"):
        deg.Op("blur", sigma=2.0, kernel_size=12)
    with pytest.raises(ValueError, match="quality in"):
        deg.Op("jpeg", quality=0)


def test_real_esrgan_is_seeded_and_sized(photo):
    pipeline = deg.degradation_from_config(load_config(f"{REPO}/configs/degradation.py"))
    assert isinstance(pipeline, deg.RealESRGANDegradation)
    outs = [pipeline(photo, np.random.default_rng(seed)) for seed in (0, 0, 1, 2)]
    np.testing.assert_array_equal(outs[0].low_res, outs[1].low_res)
    assert np.abs(outs[0].low_res - outs[2].low_res).max() > 0.05
    for out in outs:
        assert out.low_res.shape == (64, 64, 3) and out.upsampled.shape == photo.shape
        assert deg.psnr(out.upsampled, photo) < 32
        reference = deg.resize(photo, (64, 64), "area")
        assert deg.psnr(out.low_res, reference) > deg.psnr(out.low_res, reference[::-1]) + 1
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        pipeline(photo[:30], np.random.default_rng(0))


def test_config_builds_each_mixture_with_the_papers_parameters():
    for name, want in PAPER_TABLE1.items():
        built = deg.degradation_from_config(load_config(f"{REPO}/configs/degradation.py:kind={name}"))
        assert isinstance(built, deg.FixedMixture) and built.name == name
        assert _mixture_params(built) == want, name


# ---------------------------------------------------------------- against basicsr (Real-ESRGAN's own code)
@pytest.fixture(scope="module")
def basicsr():
    from tests.torch_ref import basicsr_degradations_or_skip

    return basicsr_degradations_or_skip()


def test_kernels_match_basicsr(basicsr, rng):
    for _ in range(4):
        size = int(rng.choice([7, 9, 13, 21]))
        sx, sy = rng.uniform(0.2, 3.0, 2)
        theta, beta_g, beta_p = rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 4.0), rng.uniform(1.0, 2.0)
        cutoff = rng.uniform(np.pi / 5, np.pi)
        pairs = [
            (deg.gaussian_kernel(size, sx), basicsr.bivariate_Gaussian(size, sx, sx, 0, isotropic=True)),
            (deg.gaussian_kernel(size, sx, sy, theta),
             basicsr.bivariate_Gaussian(size, sx, sy, theta, isotropic=False)),
            (deg.generalized_gaussian_kernel(size, sx, sy, theta, beta_g),
             basicsr.bivariate_generalized_Gaussian(size, sx, sy, theta, beta_g, isotropic=False)),
            (deg.plateau_kernel(size, sx, sy, theta, beta_p),
             basicsr.bivariate_plateau(size, sx, sy, theta, beta_p, isotropic=False)),
            (deg.sinc_kernel(size, cutoff, pad_to=21), basicsr.circular_lowpass_kernel(cutoff, size, pad_to=21)),
        ]
        for ours, ref in pairs:
            assert ours.shape == ref.shape
            np.testing.assert_allclose(ours, ref, atol=1e-7)


@pytest.mark.parametrize("gray", [False, True])
def test_noise_matches_basicsr_on_the_same_draws(basicsr, photo, seed, gray):
    """Ours takes a Generator; basicsr draws from numpy's global RNG. A RandomState on the same seed gives
    both the same numbers, so the noisy images must agree. basicsr's images are BGR: the gray Poisson noise
    (from the luma) gets the channels flipped; the other noises do not depend on the channel order."""
    image = photo[:64, :64]
    np.random.seed(seed)
    ref = basicsr.add_gaussian_noise(image, sigma=25.0, clip=False, gray_noise=gray)
    ours = deg.gaussian_noise(image, 25.0, np.random.RandomState(seed), gray=gray)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    bgr = np.ascontiguousarray(image[..., ::-1]) if gray else image
    np.random.seed(seed)
    ref = basicsr.add_poisson_noise(bgr, scale=2.0, clip=False, gray_noise=gray)
    ours = deg.poisson_noise(image, 2.0, np.random.RandomState(seed), gray=gray)
    np.testing.assert_allclose(ours, ref[..., ::-1] if gray else ref, atol=1e-5)
    assert np.abs(ours - image).max() > 0.02  # there is noise to compare


def test_jpeg_matches_basicsr(basicsr, photo):
    for quality in (30, 60, 95):
        ref = basicsr.add_jpg_compression(np.ascontiguousarray(photo[..., ::-1]), quality)[..., ::-1]
        np.testing.assert_allclose(deg.jpeg(photo, quality), ref, atol=1.5 / 255)
