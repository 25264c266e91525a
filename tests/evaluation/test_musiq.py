"""MUSIQ in JAX against pyiqa's MUSIQ (its `archs/musiq_arch.py` and multi-scale patching, imported without its
package): small random networks in pyiqa's layout (one score, and AVA's 10-class head), saved and read by our
converter, scored on random photos of several shapes (each scale's patch list padded and masked in the reference,
left out in ours; sides not multiples of 32). Bound 1e-4. The hashed positions equal pyiqa's for every patch-grid
size up to 40 x 40; the weight-standardised conv equals pyiqa's StdConv on its own (a biased std fails it); the
published architecture maps key for key on the meta device."""

import numpy as np
import pytest
import torch

from diffbody_jax.evaluation.musiq import MUSIQMetric, hashed_positions
from diffbody_jax.interop.mapping import ConversionError, flatten_params, plan_import
from diffbody_jax.interop.musiq import musiq_config, musiq_table
from diffbody_jax.models.musiq import MUSIQConfig, init_shapes
from tests.torch_ref import pyiqa_module, randomize_

TOL = 1e-4
TINY = dict(hidden_size=128, mlp_dim=192, num_heads=2, num_layers=2)  # heads 64 wide, as the converter assumes


@pytest.fixture(scope="module")
def musiq_arch():
    return pyiqa_module("archs.musiq_arch")


def random_musiq(module, seed: int, classes: int = 1):
    """pyiqa's MUSIQ, small, with random weights (the class token and embeddings too: pyiqa zeroes or shrinks them)."""
    net = module.MUSIQ(pretrained=False, num_class=classes, **TINY).eval()
    randomize_(net, seed)
    return net


@pytest.mark.parametrize("classes", [1, 10])
def test_musiq_matches_pyiqa(musiq_arch, classes, tmp_path, rng):
    net = random_musiq(musiq_arch, int(rng.integers(2**31)), classes)
    torch.save(net.state_dict(), tmp_path / "musiq.pth")
    metric = MUSIQMetric.from_file(tmp_path / "musiq.pth")
    assert metric.net.config.num_classes == classes
    for hw in ((96, 128), (70, 101), (300, 200)):
        photos = rng.uniform(0, 1, (2, *hw, 3)).astype(np.float32)
        with torch.no_grad():
            want = net(torch.from_numpy(photos).permute(0, 3, 1, 2)).numpy()[:, 0]
        got = metric(photos)
        assert got.shape == (2,)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=str(hw))


def test_hashed_positions_match_pyiqa():
    util = pyiqa_module("data.multiscale_trans_util")
    for rows in range(1, 41):
        for cols in (1, 3, 7, 12, 13, 29, 40):
            want = util.get_hashed_spatial_pos_emb_index(10, rows, cols).numpy().reshape(-1)
            np.testing.assert_array_equal(hashed_positions(10, rows, cols), want, err_msg=f"{rows} x {cols}")


@pytest.mark.parametrize("classes", [1, 10])
def test_the_published_musiq_maps_key_for_key(musiq_arch, classes):
    with torch.device("meta"):
        net = musiq_arch.MUSIQ(pretrained=False, num_class=classes)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    config = musiq_config({k: np.empty(s, np.float32) for k, s in shapes.items()})  # shapes only
    assert config == MUSIQConfig(num_classes=classes)
    ours = {k: tuple(v.shape) for k, v in flatten_params(init_shapes(config)).items()}
    assert len(plan_import(shapes, ours, musiq_table(), "MUSIQ (meta)")) == len(shapes) == len(ours)
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(s)) for s in shapes.values())


def test_a_wrong_file_is_named(musiq_arch, tmp_path):
    net = musiq_arch.MUSIQ(pretrained=False, **TINY)
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if k != "embedding.weight"}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"cut\.pth: not a MUSIQ checkpoint in pyiqa's layout: no embedding\.weight"):
        MUSIQMetric.from_file(tmp_path / "cut.pth")
    torch.save({**state, "head.extra": torch.zeros(1)}, tmp_path / "stray.pth")
    with pytest.raises(ConversionError, match=r"head\.extra"):
        MUSIQMetric.from_file(tmp_path / "stray.pth")


@pytest.mark.parametrize("kernel, stride", [(7, 2), (3, 1), (1, 1)])
def test_the_weight_standardised_conv_matches_pyiqas_stdconv(musiq_arch, kernel, stride, rng):
    """Alone, not behind a GroupNorm (which would hide a kernel scaled by the wrong standard deviation): unbiased std,
    eps 1e-5 added to it, TF "SAME" padding."""
    from diffbody_jax.interop.mapping import CONV_OIHW_TO_HWIO
    from diffbody_jax.models.musiq import _std_conv

    ref = musiq_arch.StdConv(5, 8, kernel, stride, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.normal(0.3, 0.05, ref.weight.shape).astype(np.float32)))
    x = rng.normal(0, 1, (2, 5, 32, 32)).astype(np.float32)  # square, as MUSIQ's patches are
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()
    kernel_hwio = CONV_OIHW_TO_HWIO.to_flax(ref.weight.detach().numpy())
    got = _std_conv(8, kernel, stride, 32, "c").apply({"params": {"kernel": kernel_hwio}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
