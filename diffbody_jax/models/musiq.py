"""MUSIQ (Ke et al., ICCV 2021, "MUSIQ: Multi-scale Image Quality Transformer"), the network of pyiqa's port of
the official checkpoints (`pyiqa/archs/musiq_arch.py`), NHWC inside.

    net = MUSIQ(MUSIQConfig())
    score = net.apply({"params": params}, patches, spatial_ids, scale_ids)    # -> [B]

The input is what `evaluation.musiq.multiscale_patches` cuts from a photo: 32 x 32 patches of the photo resized
to each longer side (224, 384) and at its own size, with each patch's hashed grid position and scale index. Each
patch goes through a BiT root (weight-standardised 7x7 conv, GroupNorm, max pool) and one bottleneck; its 8 x 8 x
256 features, flattened in TF's (h, w, c) order, are embedded, the position and scale embeddings added, a class
token prepended, and a pre-norm transformer (the shared `CLIPEncoder`, exact GELU) reads it. The class token's
head gives the score: one number (KonIQ, SPAQ, PaQ-2-PiQ checkpoints) or, with 10 classes (AVA), the mean of a
softmax distribution over 1..10.

The reference pads each scale's patch list to a fixed length and masks the padding with -1e3 on both sides of the
attention, so that padding never reaches the class token; our shapes are static per photo size, so the padding
is left out, which gives the same score.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.clip import CLIPEncoder
from diffbody_jax.models.layers import Array, Conv2D, Dtype, Precision, dense, group_norm, layer_norm

ROOT_WIDTH = 64  # the BiT root's channels, fixed in the architecture (bottleneck out: 4x)
STD_CONV_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class MUSIQConfig:
    """The published checkpoints' architecture (pyiqa's MUSIQ defaults); `num_classes` 10 for AVA, else 1."""

    patch_size: int = 32
    hidden_size: int = 384
    mlp_dim: int = 1152
    num_heads: int = 6
    num_layers: int = 14
    num_scales: int = 3  # len(longer_side_lengths) + 1 (the photo's own size)
    grid_size: int = 10  # hashed spatial positions: grid_size x grid_size
    num_classes: int = 1
    longer_side_lengths: tuple[int, ...] = (224, 384)
    max_seq_len_from_original_res: int = -1  # patches kept at the photo's own size; -1: all

    def __post_init__(self):
        problems = []
        if self.patch_size % 4:
            problems.append(f"patch_size={self.patch_size} (a multiple of 4: the root divides it by 4)")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_scales != len(self.longer_side_lengths) + 1:
            problems.append(f"num_scales={self.num_scales} for longer sides {self.longer_side_lengths} (+1 original)")
        if problems:
            raise ValueError("MUSIQConfig: " + "; ".join(problems))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's "SAME" padding of one axis: the extra pixel, if any, at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _std_conv(features: int, kernel: int, stride: int, size: int, name: str) -> Conv2D:
    pad = same_padding(size, kernel, stride)
    return Conv2D(features, (kernel, kernel), (stride, stride), (pad, pad), use_bias=False,
                  standardize_eps=STD_CONV_EPS, name=name)


class Bottleneck(nn.Module):
    """BiT's pre-activation-free bottleneck with GroupNorm(32, eps 1e-4) and a projected shortcut. x: [N, h, w, C]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width, size = x.shape[-1], x.shape[1]
        shortcut = x
        if width != self.features:
            shortcut = group_norm(self, 32, 1e-4, "gn_proj")(_std_conv(self.features, 1, 1, size, "conv_proj")(x))
        y = nn.relu(group_norm(self, 32, 1e-4, "gn1")(_std_conv(width, 1, 1, size, "conv1")(x)))
        y = nn.relu(group_norm(self, 32, 1e-4, "gn2")(_std_conv(width, 3, 1, size, "conv2")(y)))
        y = group_norm(self, 32, 1e-4, "gn3")(_std_conv(self.features, 1, 1, size, "conv3")(y))
        return nn.relu(y + shortcut)


class MUSIQ(nn.Module):
    """patches [B, N, P, P, 3] in [-1, 1]; spatial_ids, scale_ids [N] int -> scores [B] (module docstring)."""

    config: MUSIQConfig = MUSIQConfig()
    attention_backend: str = "einsum"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, patches: Array, spatial_ids: Array, scale_ids: Array) -> Array:
        c = self.config
        b, n, p = patches.shape[:3]
        x = _std_conv(ROOT_WIDTH, 7, 2, p, "conv_root")(patches.reshape(b * n, p, p, 3))
        x = nn.relu(group_norm(self, 32, 1e-6, "gn_root")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), (same_padding(x.shape[1], 3, 2),) * 2)  # after ReLU: -inf pads = 0 pads
        x = Bottleneck(ROOT_WIDTH * 4, name="block1")(x)
        x = dense(self, c.hidden_size, "embedding")(x.reshape(b, n, -1))
        # the reference's shapes ([1, G*G, D], [1, 1, D]), so that its checkpoints map by name
        position = self.param("position_emb", nn.initializers.normal(0.02), (1, c.grid_size ** 2, c.hidden_size))
        scale = self.param("scale_emb", nn.initializers.normal(0.02), (c.num_scales, c.hidden_size))
        x = x + position[0, spatial_ids][None] + scale[scale_ids][None]
        cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, c.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
        x, _ = CLIPEncoder(num_layers=c.num_layers, heads=c.num_heads, intermediate_size=c.mlp_dim,
                           hidden_act="gelu", eps=1e-6, attention_backend=self.attention_backend, name="encoder")(x)
        q = dense(self, c.num_classes, "head")(layer_norm(self, 1e-6, "encoder_norm")(x[:, 0]))
        if c.num_classes == 1:
            return q[:, 0]
        return jax.nn.softmax(q, axis=-1) @ jnp.arange(1, c.num_classes + 1, dtype=q.dtype)


def init_shapes(config: MUSIQConfig = MUSIQConfig()):
    """The params' shapes, without memory."""
    p = config.patch_size
    patches = jax.ShapeDtypeStruct((1, 2, p, p, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)
    return jax.eval_shape(lambda x, i: MUSIQ(config).init(jax.random.key(0), x, i, i), patches, ids)["params"]
