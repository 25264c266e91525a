"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), v0.1.

    net = LPIPSNet("alex")                                  # or "vgg"
    d = net.apply({"params": params}, x0, x1)               # NHWC images in [-1, 1] -> [B] distances

d(x0, x1) = sum_l mean_{h,w} w_l . (f_l(x0) - f_l(x1))^2, where f_l are the backbone's activations at five ReLUs
(`TAPS`), each unit-normalised over channels (x / (||x||_2 + 1e-10)), and w_l the learned non-negative channel
weights ("lin" layers, 1x1 convolutions without bias). Inputs pass the scaling layer first: (x - shift) / scale with
ImageNet's statistics in [-1, 1] units. The backbones are torchvision's `features` stacks (AlexNet, VGG16), with
their PyTorch indices as module names (`features_0`, ...), so the converter (`interop.lpips`) maps index for index.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.layers import Conv2D

Array = jax.Array

# torchvision's `features`, index by index: ("conv", out channels, kernel, stride, padding), "relu", ("pool", k, s)
BACKBONES = {
    "alex": (("conv", 64, 11, 4, 2), "relu", ("pool", 3, 2), ("conv", 192, 5, 1, 2), "relu", ("pool", 3, 2),
             ("conv", 384, 3, 1, 1), "relu", ("conv", 256, 3, 1, 1), "relu", ("conv", 256, 3, 1, 1), "relu"),
    "vgg": tuple(layer for block in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
                 for layer in [*(x for c in block for x in (("conv", c, 3, 1, 1), "relu")), ("pool", 2, 2)])[:-1],
}
# the indices of the ReLUs whose outputs LPIPS compares (lpips' relu1..relu5 slices end there)
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def unit_normalise(x: Array) -> Array:
    """Each position's channel vector divided by its L2 norm (+ 1e-10, as lpips)."""
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + NORM_EPS)


class LPIPSFeatures(nn.Module):
    """The backbone's activations at `TAPS[backbone]`: NHWC [B, H, W, 3] (scaled) -> five NHWC maps."""

    backbone: str = "alex"

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        taps = []
        for index, layer in enumerate(BACKBONES[self.backbone]):
            if layer == "relu":
                x = nn.relu(x)
            elif layer[0] == "pool":
                x = nn.max_pool(x, (layer[1], layer[1]), strides=(layer[2], layer[2]), padding="VALID")
            else:
                _, features, k, s, p = layer
                x = Conv2D(features, (k, k), (s, s), ((p, p), (p, p)), name=f"features_{index}")(x)
            if index in TAPS[self.backbone]:
                taps.append(x)
        return taps


class LPIPSNet(nn.Module):
    """LPIPS v0.1 (module docstring): x0, x1 [B, H, W, 3] in [-1, 1] -> [B]. per_layer: also the five layer terms
    ([B, 5])."""

    backbone: str = "alex"

    def setup(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"LPIPS backbone {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        self.features = LPIPSFeatures(self.backbone)
        self.lins = [Conv2D(1, (1, 1), padding=((0, 0), (0, 0)), use_bias=False, name=f"lin{i}")
                     for i in range(len(TAPS[self.backbone]))]

    def __call__(self, x0: Array, x1: Array, per_layer: bool = False):
        shift, scale = jnp.asarray(SHIFT, x0.dtype), jnp.asarray(SCALE, x0.dtype)
        f0 = self.features((x0 - shift) / scale)
        f1 = self.features((x1 - shift) / scale)
        terms = [jnp.mean(lin(jnp.square(unit_normalise(a) - unit_normalise(b))), axis=(1, 2, 3))
                 for lin, a, b in zip(self.lins, f0, f1, strict=True)]
        total = sum(terms)
        return (total, jnp.stack(terms, -1)) if per_layer else total
