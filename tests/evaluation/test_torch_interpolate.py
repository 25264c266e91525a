"""Resizing as torch's F.interpolate (bilinear, bicubic; align_corners=False; by size and by scale factor) against
torch itself on random images: enlarging, shrinking, odd sizes, both axes at once. Bound 1e-5 on values in [0, 1]
(float32 sums in another order)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffbody_jax.evaluation.torch_interpolate import interpolate, interpolation_matrix

TOL = 1e-5


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_interpolate_matches_torch(mode, rng):
    x = rng.uniform(0, 1, (2, 37, 53, 3)).astype(np.float32)
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    for size in [(224, 160), (13, 20), (37, 53), (100, 7), (384, 550)]:
        want = F.interpolate(nchw, size, mode=mode, align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(interpolate(x, size, mode)), want, rtol=0, atol=TOL, err_msg=str(size))
    for factor in [225 / 37, 1.5, 0.5, 6.0811]:  # torch maps coordinates with 1 / factor, not in / out
        want = F.interpolate(nchw, scale_factor=factor, mode=mode, align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(interpolate(x, None, mode, scale_factor=factor))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=str(factor))


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'nearest'"):
        interpolation_matrix(4, 8, "nearest")
