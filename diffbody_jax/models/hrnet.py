"""HRNet (Wang et al. 2019), the backbone of the BPBreID body-part network. NHWC, inference-mode BatchNorm.

    net = HRNet(HRNetConfig())  # W32; configs/bodypart.py:variant=tiny has a small one
    feats = net.apply({"params": p, "batch_stats": s}, image)  # [stem, branch_0 .. branch_3]

A stride-4 stem (two 3x3 stride-2 convs), a stage of Bottlenecks, then stages of parallel branches at
1/4, 1/8, 1/16, 1/32 resolution whose modules exchange information after every block group (each
output branch sums all inputs: 1x1 conv + nearest upsampling from lower resolutions, strided 3x3 convs
from higher ones). BatchNorm uses stored statistics (collection "batch_stats"): the network is a frozen
feature extractor in DiffBody, and gradients flow through it to the image.

Submodule names are timm's attribute paths with list indices joined by "_" and Sequential indices as
child names (`stage3_1/branches_2_0/conv1`, `transition2_2/0/0`), so `interop/hrnet.py` derives the
mapping from the names alone.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from diffbody_jax.models.layers import Array, BatchNorm, Dtype, Precision, conv
from diffbody_jax.models.variables import ModelVariables

BN_EPS = 1e-5
STEM_OUT = 64  # the second stem conv has 64 channels in every HRNet, whatever stem_width is
W32_INCRE = (32, 64, 128, 256)  # fixed in timm and in HRNet-Image-Classification, whatever the width


@dataclasses.dataclass(frozen=True)
class StageConfig:
    num_modules: int
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class HRNetConfig:
    """stem_width, the Bottleneck stage (layer1), then the multi-branch stages 2-4.

    incre_planes: the classification design's "incre" head, one Bottleneck per branch widening it to 4x
    planes (W32: 32, 64, 128, 256 -> 128, 256, 512, 1024 channels; empty: no incre modules). BPBreID
    uses it; the plain feature network does not.
    """

    stem_width: int = 64
    layer1_blocks: int = 4
    layer1_channels: int = 64
    stages: tuple[StageConfig, ...] = (
        StageConfig(1, (4, 4), (32, 64)),
        StageConfig(4, (4, 4, 4), (32, 64, 128)),
        StageConfig(3, (4, 4, 4, 4), (32, 64, 128, 256)),
    )
    incre_planes: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> HRNetConfig:
        """Inverse of `dataclasses.asdict` (JSON lists accepted); unknown keys are refused by name."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown HRNet fields {unknown}")
        d = dict(d)
        if "stages" in d:
            d["stages"] = tuple(StageConfig(s["num_modules"], tuple(s["num_blocks"]), tuple(s["num_channels"]))
                                for s in d["stages"])
        if "incre_planes" in d:
            d["incre_planes"] = tuple(d["incre_planes"])
        return cls(**d)

    def __post_init__(self):
        if self.incre_planes and len(self.incre_planes) != len(self.stages[-1].num_channels):
            raise ValueError(f"HRNetConfig: incre_planes {self.incre_planes} needs one entry per final branch "
                             f"({len(self.stages[-1].num_channels)})")

    @property
    def out_channels(self) -> tuple[int, ...]:
        if self.incre_planes:
            return tuple(4 * p for p in self.incre_planes)
        return self.stages[-1].num_channels


class HRModule(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None


def batch_norm(m: HRModule, name: str) -> BatchNorm:
    return BatchNorm(epsilon=BN_EPS, dtype=m.dtype, param_dtype=m.param_dtype, name=name)


def _conv(m: HRModule, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return conv(m, features, kernel, name, stride=stride, use_bias=False)


class ConvBN(HRModule):
    """torch Sequential(Conv2d(bias=False unless use_bias), BatchNorm2d[, ReLU]): children "0" and "1"."""

    features: int = 0
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = conv(self, self.features, self.kernel, "0", stride=self.stride, use_bias=self.use_bias)(x)
        x = batch_norm(self, "1")(y)
        return nn.relu(x) if self.relu else x


class Block(HRModule):
    """timm's BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1 x4), with a conv shortcut when shapes change."""

    planes: int = 0
    bottleneck: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.planes * (4 if self.bottleneck else 1)
        kernels = (1, 3, 1) if self.bottleneck else (3, 3)
        widths = (self.planes, self.planes, out_ch) if self.bottleneck else (self.planes, self.planes)
        y = x
        for i, (k, w) in enumerate(zip(kernels, widths, strict=True)):
            y = batch_norm(self, f"bn{i + 1}")(_conv(self, w, k, 1, f"conv{i + 1}")(y))
            if i < len(kernels) - 1:
                y = nn.relu(y)
        shortcut = x
        if x.shape[-1] != out_ch:
            shortcut = ConvBN(self.dtype, self.param_dtype, self.precision, out_ch, 1, 1, False, name="downsample")(x)
        return nn.relu(y + shortcut)


class MultiResolutionModule(HRModule):
    """Branches of BasicBlocks, then the exchange: out_i = relu(sum_j f_ij(x_j))."""

    num_blocks: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, xs: list[Array]) -> list[Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        xs = list(xs)
        for b, (n, ch) in enumerate(zip(self.num_blocks, self.channels, strict=True)):
            for k in range(n):
                xs[b] = Block(**kw, planes=ch, name=f"branches_{b}_{k}")(xs[b])
        if len(xs) == 1:
            return xs
        out = []
        for i, ch_i in enumerate(self.channels):
            total = None
            for j, x in enumerate(xs):
                if j > i:
                    y = ConvBN(**kw, features=ch_i, kernel=1, relu=False, name=f"fuse_layers_{i}_{j}")(x)
                    y = jnp.repeat(jnp.repeat(y, 2 ** (j - i), axis=1), 2 ** (j - i), axis=2)
                elif j == i:
                    y = x
                else:
                    name = f"fuse_layers_{i}_{j}"
                    y = FuseDown(**kw, steps=i - j, in_ch=self.channels[j], out_ch=ch_i, name=name)(x)
                total = y if total is None else total + y
            out.append(nn.relu(total))
        return out


class FuseDown(HRModule):
    """(steps) strided 3x3 ConvBNs: the last maps to out_ch without ReLU. Children "0", "1", ..."""

    steps: int = 1
    in_ch: int = 0
    out_ch: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        for k in range(self.steps):
            last = k == self.steps - 1
            x = ConvBN(**kw, features=self.out_ch if last else self.in_ch, stride=2, relu=not last, name=str(k))(x)
        return x


class NewBranch(HRModule):
    """A new branch of the next stage: strided 3x3 ConvBNs from the lowest-resolution branch, the last one
    to `features` channels. Children "0", "1", ..."""

    steps: int = 1
    features: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        for k in range(self.steps):
            width = self.features if k == self.steps - 1 else x.shape[-1]
            x = ConvBN(**kw, features=width, stride=2, name=str(k))(x)
        return x


class HRNet(ModelVariables, HRModule):
    """[B, H, W, 3] normalised image -> [stem (H/2, stem_width), branch_b (H/2^(b+2), out_channels_b) ...].

    With `incre_planes` each branch output has passed its incre Bottleneck (timm's feature_location="incre").
    """

    config: HRNetConfig = HRNetConfig()

    @nn.compact
    def __call__(self, image: Array) -> list[Array]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        stem = nn.relu(batch_norm(self, "bn1")(_conv(self, cfg.stem_width, 3, 2, "conv1")(image)))
        x = nn.relu(batch_norm(self, "bn2")(_conv(self, STEM_OUT, 3, 2, "conv2")(stem)))
        for k in range(cfg.layer1_blocks):
            x = Block(**kw, planes=cfg.layer1_channels, bottleneck=True, name=f"layer1_{k}")(x)
        xs, prev = [x], (cfg.layer1_channels * 4,)
        for s, stage in enumerate(cfg.stages):
            new = []
            for i, ch in enumerate(stage.num_channels):
                name = f"transition{s + 1}_{i}"
                if i < len(prev):
                    new.append(xs[i] if prev[i] == ch else ConvBN(**kw, features=ch, name=name)(xs[i]))
                else:
                    new.append(NewBranch(**kw, steps=i + 1 - len(prev), features=ch, name=name)(xs[-1]))
            xs = new
            for k in range(stage.num_modules):
                xs = MultiResolutionModule(**kw, num_blocks=stage.num_blocks, channels=stage.num_channels,
                                           name=f"stage{s + 2}_{k}")(xs)
            prev = stage.num_channels
        if cfg.incre_planes:
            xs = [Block(**kw, planes=p, bottleneck=True, name=f"incre_modules_{i}_0")(x)
                  for i, (p, x) in enumerate(zip(cfg.incre_planes, xs, strict=True))]
        return [stem, *xs]

    def dummy_inputs(self, batch: int = 1, size: int = 64) -> dict[str, Array]:
        return {"image": jnp.zeros((batch, size, size, 3), self.dtype)}
