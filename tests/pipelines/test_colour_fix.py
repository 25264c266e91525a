"""Colour correction toward I_ir against float64 numpy / scipy formulas, and what each keeps."""

import numpy as np
import pytest
from scipy import ndimage

from diffbody_jax.pipelines.colour_fix import adain, colour_fix, wavelet, wavelet_split


def _images(rng, shape=(2, 40, 56, 3)):
    from skimage import data

    photo = data.astronaut()[100:100 + shape[1], 150:150 + shape[2]].astype(np.float64) / 255
    restored = np.stack([np.clip(photo * 0.7 + 0.2 + rng.normal(0, 0.02, photo.shape), 0, 1)] * shape[0])
    reference = np.stack([photo] * shape[0])
    return restored, reference


def test_adain_matches_the_formula(rng):
    x, r = _images(rng)
    def stats(a):
        return a.mean(axis=(1, 2), keepdims=True), np.sqrt(a.var(axis=(1, 2), ddof=1, keepdims=True) + 1e-5)
    (mx, sx), (mr, sr) = stats(x), stats(r)
    want = (x - mx) / sx * sr + mr
    got = np.asarray(adain(x.astype(np.float32), r.astype(np.float32)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_wavelet_matches_scipy_a_trous(rng):
    x, r = _images(rng)

    def low(a, levels=5):
        for i in range(levels):
            d = 2**i
            k = np.zeros(2 * d + 1)
            k[[0, d, 2 * d]] = [0.25, 0.5, 0.25]
            a = ndimage.convolve1d(ndimage.convolve1d(a, k, axis=1, mode="nearest"), k, axis=2, mode="nearest")
        return a

    want = (x - low(x)) + low(r)
    np.testing.assert_allclose(np.asarray(wavelet(x.astype(np.float32), r.astype(np.float32))), want, atol=1e-5)
    high, lo = wavelet_split(x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(high + lo), x, atol=1e-6)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_the_fix_moves_colour_toward_the_reference(rng, method):
    x, r = _images(rng)
    fixed = np.asarray(colour_fix(x.astype(np.float32), r.astype(np.float32), method))
    before = np.abs(x.mean(axis=(1, 2)) - r.mean(axis=(1, 2))).max()
    after = np.abs(fixed.mean(axis=(1, 2)) - r.mean(axis=(1, 2))).max()
    assert after < before / 5, (before, after)
    assert np.array_equal(np.asarray(colour_fix(x, r, "none")), x)
    with pytest.raises(ValueError, match="expected one of"):
        colour_fix(x, r, "histogram")
