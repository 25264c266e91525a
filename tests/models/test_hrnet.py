"""HRNet backbone of the body-part network: parity with timm's hrnet features, real-size coverage."""

import functools

import jax
import numpy as np
import pytest

from diffbody_jax.interop.hrnet import hrnet_table
from diffbody_jax.interop.mapping import flax_to_torch, torch_to_flax
from diffbody_jax.models.hrnet import HRNet, HRNetConfig
from tests.torch_ref import (
    hrnet_config,
    nchw_to_nhwc,
    nhwc_to_nchw,
    randomize_,
    randomize_batch_norm_stats_,
    state_dict_numpy,
    timm_hrnet_or_skip,
)

torch = pytest.importorskip("torch")
timm_hrnet = timm_hrnet_or_skip()


def timm_cfg(c: HRNetConfig) -> dict:
    def stage(s, block):
        return dict(num_modules=s.num_modules, num_branches=len(s.num_channels), block_type=block,
                    num_blocks=s.num_blocks, num_channels=s.num_channels, fuse_method="SUM")

    d = dict(stem_width=c.stem_width, stage1=dict(num_modules=1, num_branches=1, block_type="BOTTLENECK",
                                                 num_blocks=(c.layer1_blocks,), num_channels=(c.layer1_channels,),
                                                 fuse_method="SUM"))
    for i, s in enumerate(c.stages):
        d[f"stage{i + 2}"] = stage(s, "BASIC")
    return d


def _reference(config: HRNetConfig, seed: int):
    ref = timm_hrnet.HighResolutionNetFeatures(timm_cfg(config), feature_location="").eval()
    randomize_(ref, seed)
    randomize_batch_norm_stats_(ref, seed)
    return ref


@functools.cache
def _shapes(config: HRNetConfig):
    return jax.eval_shape(lambda: HRNet(config=config).init_variables(jax.random.key(0)))


def test_features_match_timm(rng):
    config = hrnet_config(incre_planes=())
    ref = _reference(config, seed=4)
    variables = torch_to_flax(state_dict_numpy(ref), hrnet_table(_shapes(config)), _shapes(config), "timm")
    x = rng.standard_normal((2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        want = [nchw_to_nhwc(t.numpy()) for t in ref(torch.from_numpy(nhwc_to_nchw(x)))]
    got = jax.jit(HRNet(config=config).apply)(variables, x)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert [g.shape[1] for g in got] == [32, 16, 8, 4, 2]
    for g, w in zip(got, want, strict=True):
        assert w.std() > 0.05
        assert np.abs(np.asarray(g) - w).max() <= 1e-4
    back = flax_to_torch(variables, hrnet_table(_shapes(config)))
    for key, value in state_dict_numpy(ref).items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value)


