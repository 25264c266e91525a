"""--fit bucket: the nearest-aspect bucket, the whole photo inside it, and back to the photo's size."""

import numpy as np
import pytest

from diffbody_jax.pipelines.fit import fit_to_bucket

BUCKETS = [(512, 512), (768, 512), (512, 768), (1024, 512), (512, 1024)]


@pytest.mark.parametrize("size, bucket", [((600, 400), (768, 512)), ((300, 310), (512, 512)),
                                          ((200, 900), (512, 1024)), ((1536, 2048), (512, 768))])
def test_the_photo_fits_whole_and_comes_back_at_its_size(rng, size, bucket):
    from skimage import data

    photo = data.astronaut().astype(np.float32) / 255
    photo = np.ascontiguousarray(photo[: size[0], : size[1]]) if size[0] <= 512 and size[1] <= 512 else \
        rng.uniform(0, 1, (*size, 3)).astype(np.float32)
    fitted = fit_to_bucket(photo, BUCKETS)
    assert fitted.bucket == bucket and fitted.pixels.shape == (*bucket, 3)
    top, left, h, w = fitted.inner
    assert h == bucket[0] or w == bucket[1]  # scaled to touch the bucket on one side
    assert abs(h / w - size[0] / size[1]) < 0.02  # aspect kept
    back = fitted.unfit(fitted.pixels)
    assert back.shape == photo.shape
    if size[0] <= 512 and size[1] <= 512:  # a smooth photo survives the up-and-down scaling closely
        assert np.abs(back - photo).mean() < 0.02
    with pytest.raises(ValueError, match="bucket's size"):
        fitted.unfit(photo)


def test_the_border_mirrors_the_photo():
    photo = np.linspace(0, 1, 512 * 300 * 3, dtype=np.float32).reshape(512, 300, 3)
    fitted = fit_to_bucket(photo, [(512, 512)])
    top, left, h, w = fitted.inner
    assert (top, h, w) == (0, 512, 300) and left == 106
    np.testing.assert_array_equal(fitted.pixels[:, left - 1], photo[:, 0])  # first reflected column
    np.testing.assert_array_equal(fitted.pixels[:, left: left + w], photo)
