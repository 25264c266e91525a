"""Our JAX PSNR / SSIM / CPSNR / CSSIM against scikit-image's on fresh images (1e-4)."""

import numpy as np
import pytest

from diffbody_jax.evaluation.metrics import image_metrics

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_color = pytest.importorskip("skimage.color")


def _pair(rng, h, w):
    from skimage import data

    photo = data.astronaut()[:h, :w].astype(np.float64) / 255
    noisy = np.clip(photo + rng.normal(0, 0.08, photo.shape) + 0.03, 0, 1)
    return noisy, photo


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80), (11, 23)])
def test_metrics_match_scikit_image(rng, h, w):
    restored, target = _pair(rng, h, w)
    ours = {k: np.asarray(v) for k, v in image_metrics(restored[None].astype(np.float32),
                                                       target[None].astype(np.float32)).items()}
    y = lambda x: skimage_color.rgb2ycbcr(x)[..., 0] / 255.0  # noqa: E731  BT.601 studio range
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    want = {
        "psnr": skimage_metrics.peak_signal_noise_ratio(y(target), y(restored), data_range=1.0),
        "ssim": skimage_metrics.structural_similarity(y(target), y(restored), **kw),
        "cpsnr": skimage_metrics.peak_signal_noise_ratio(target, restored, data_range=1.0),
        "cssim": skimage_metrics.structural_similarity(target, restored, channel_axis=-1, **kw),
    }
    for name, value in want.items():
        assert abs(float(ours[name][0]) - value) <= 1e-4, (name, float(ours[name][0]), value)


def test_batches_score_each_image_and_identical_images_score_perfectly(rng):
    a, b = _pair(rng, 32, 32)
    batch = np.stack([a, b]).astype(np.float32)
    scores = image_metrics(batch, np.stack([b, b]).astype(np.float32))
    assert np.isinf(float(scores["psnr"][1])) and abs(float(scores["ssim"][1]) - 1) < 1e-6
    assert float(scores["cpsnr"][0]) < 40 and float(scores["cssim"][0]) < 0.99
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        image_metrics(batch[:, :8], batch[:, :8])
