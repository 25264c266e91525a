"""LPIPS as an evaluation metric: batched and jitted, on images in [0, 1].

    metric = LPIPSMetric.from_files("alex", "alexnet-owt-7be5be79.pth")       # lin layers: the lpips package's
    d = metric(restored, ground_truth)                                          # [B, H, W, 3] x 2 -> [B]

The backbone comes from a torchvision state-dict file the user has (nothing is downloaded); the linear layers from
the lpips package's wheel (`pip install --no-deps lpips`) or a given file. `models.lpips` has the network.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.interop.lpips import lpips_params
from diffbody_jax.models.lpips import LPIPSNet


@functools.partial(jax.jit, static_argnums=0)
def _lpips(net: LPIPSNet, params, a, b):
    return net.apply({"params": params}, a * 2.0 - 1.0, b * 2.0 - 1.0)  # [0, 1] -> lpips' [-1, 1]


class LPIPSMetric:
    """LPIPS v0.1 with an AlexNet ("alex", lpips' default and the restoration papers' usual choice) or VGG16
    ("vgg") backbone. Lower is better."""

    def __init__(self, backbone: str, params):
        self.backbone, self.net, self.params = backbone, LPIPSNet(backbone), params

    @classmethod
    def from_files(cls, backbone: str, backbone_weights: str | os.PathLike,
                   lin_weights: str | os.PathLike | None = None) -> LPIPSMetric:
        return cls(backbone, jax.tree.map(jnp.asarray, lpips_params(backbone, backbone_weights, lin_weights)))

    def __call__(self, a, b) -> np.ndarray:
        """[B, H, W, 3] x 2, RGB in [0, 1], the same size -> [B] float distances."""
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS: expected two [B, H, W, 3] batches of one shape, got {a.shape} and {b.shape}")
        return np.asarray(_lpips(self.net, self.params, a, b))
