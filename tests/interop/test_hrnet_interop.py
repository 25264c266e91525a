"""HRNet-W32: every timm key maps, on the meta device."""

import numpy as np
import pytest

from diffbody_jax.interop.hrnet import hrnet_table
from diffbody_jax.models.hrnet import HRNetConfig
from tests.models.test_hrnet import _shapes, timm_cfg  # noqa: F401
from tests.torch_ref import (
    timm_hrnet_or_skip,
)

torch = pytest.importorskip("torch")
timm_hrnet = timm_hrnet_or_skip()


def test_w32_coverage():
    """The real HRNet-W32: every timm key of the feature network maps, the parameter counts agree."""
    config = HRNetConfig()
    with torch.device("meta"):
        ref = timm_hrnet.HighResolutionNetFeatures(timm_cfg(config), feature_location="")
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    from diffbody_jax.interop.mapping import flatten_params, plan_import

    ours = {k: tuple(v.shape) for k, v in flatten_params(_shapes(config)).items()}
    plan = plan_import(shapes, ours, hrnet_table(_shapes(config)), "hrnet_w32")
    n_params = sum(p.numel() for p in ref.parameters())
    assert len(plan) == len([k for k in shapes if not k.endswith("num_batches_tracked")])
    assert sum(int(np.prod(s)) for k, s in ours.items() if k.startswith("params/")) == n_params == 29_305_536
