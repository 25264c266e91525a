"""CLIP's ResNet image tower (Radford et al. 2021, "ModifiedResNet"): the RN50 that CLIP-IQA scores images with.

    net = CLIPResNet(CLIPResNetConfig())                                   # RN50
    emb = net.apply({"params": p, "batch_stats": s}, images)               # NHWC, CLIP-normalised -> [B, 1024]

Against torchvision's ResNet: a stem of three 3x3 convolutions (the first with stride 2) and a 2x2 average pool;
bottlenecks that downsample by a 2x2 average pool after their 3x3 convolution (and before the shortcut's 1x1
convolution), not by strided convolutions; and an attention pool instead of global average pooling: the mean of the
final map's positions is a query token that attends over itself and every position (multi-head, biased q/k/v and an
output projection to `output_dim`), after a learned positional embedding (`input_resolution / 32` squared + 1
positions). `pos_embedding=False` leaves that embedding out, so any image size works: CLIP-IQA's choice (the CLIP-IQA
paper removes it to score images at their own resolution). BatchNorm runs on stored statistics ("batch_stats").
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.layers import Array, Attention, BatchNorm, Conv2D


@dataclasses.dataclass(frozen=True)
class CLIPResNetConfig:
    """OpenAI's RN50: layers (3, 4, 6, 3), width 64, output 1024, 224 px. RN101: (3, 4, 23, 3), width 64, 512."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    output_dim: int = 1024
    heads: int = 32  # OpenAI: width * 32 // 64
    input_resolution: int = 224

    @property
    def embed_dim(self) -> int:
        return self.width * 32


def _avg_pool(x: Array, k: int) -> Array:
    return nn.avg_pool(x, (k, k), strides=(k, k)) if k > 1 else x


def _conv(features: int, k: int, name: str, stride: int = 1) -> Conv2D:
    return Conv2D(features, (k, k), (stride, stride), ((k // 2, k // 2),) * 2, use_bias=False, name=name)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (2x2 average pool) -> 1x1 (x4 channels), each with BatchNorm; the shortcut pools and
    projects when the shape changes. NHWC in and out."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = nn.relu(BatchNorm(name="bn1")(_conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(BatchNorm(name="bn2")(_conv(self.planes, 3, "conv2")(out)))
        out = BatchNorm(name="bn3")(_conv(self.planes * 4, 1, "conv3")(_avg_pool(out, self.stride)))
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            x = BatchNorm(name="downsample_1")(_conv(self.planes * 4, 1, "downsample_0")(_avg_pool(x, self.stride)))
        return nn.relu(out + x)


class AttentionPool(nn.Module):
    """[B, H, W, C] -> [B, output_dim]: the positions' mean attends over [mean, positions] (module docstring)."""

    config: CLIPResNetConfig

    @nn.compact
    def __call__(self, x: Array, pos_embedding: bool = True) -> Array:
        c = self.config
        b, h, w, ch = x.shape
        tokens = x.reshape(b, h * w, ch)
        tokens = jnp.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1)
        positions = (c.input_resolution // 32) ** 2 + 1
        table = self.param("positional_embedding", nn.initializers.normal(ch ** -0.5), (positions, ch))
        if pos_embedding:
            if tokens.shape[1] != positions:
                raise ValueError(f"CLIP ResNet attention pool: a {h} x {w} map has {h * w + 1} tokens, the positional "
                                 f"embedding {positions} (images of {c.input_resolution} px); pass pos_embedding=False "
                                 "to score other sizes")
            tokens = tokens + table[None].astype(tokens.dtype)
        pooled = Attention(c.heads, ch // c.heads, c.output_dim, qkv_bias=True, name="attn")(tokens[:, :1], tokens)
        return pooled[:, 0]


class CLIPResNet(nn.Module):
    """CLIP's ResNet image tower: images [B, H, W, 3], normalised with CLIP's mean and std -> [B, output_dim]."""

    config: CLIPResNetConfig = CLIPResNetConfig()

    @nn.compact
    def __call__(self, images: Array, pos_embedding: bool = True) -> Array:
        c = self.config
        x = images
        for i, (features, stride) in enumerate(((c.width // 2, 2), (c.width // 2, 1), (c.width, 1)), start=1):
            x = nn.relu(BatchNorm(name=f"bn{i}")(_conv(features, 3, f"conv{i}", stride)(x)))
        x = _avg_pool(x, 2)
        for i, blocks in enumerate(c.layers):
            for j in range(blocks):
                x = Bottleneck(c.width * 2 ** i, stride=2 if (i > 0 and j == 0) else 1, name=f"layer{i + 1}_{j}")(x)
        return AttentionPool(c, name="attnpool")(x, pos_embedding)


def init_shapes(config: CLIPResNetConfig = CLIPResNetConfig()):
    """The variables' shapes ({"params", "batch_stats"}), without memory."""
    x = jax.ShapeDtypeStruct((1, config.input_resolution, config.input_resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: CLIPResNet(config).init(jax.random.key(0), x), x)
