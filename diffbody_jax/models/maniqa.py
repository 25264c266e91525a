"""MANIQA (Yang et al., CVPR workshops 2022, "MANIQA: Multi-dimension Attention Network for No-Reference Image
Quality Assessment"), the network of pyiqa's port (`pyiqa/archs/maniqa_arch.py`, `maniqa_swin.py`), NHWC inside.

    net = MANIQA(MANIQAConfig())
    scores, weights = net.apply({"params": params}, crops)     # crops [N, 224, 224, 3] -> [N, 784] each

A ViT-B/8 (timm's `vit_base_patch8_224`: the shared `CLIPEncoder` with exact GELU and LayerNorm eps 1e-6) reads a
224 x 224 crop; the patch tokens of blocks 7-10 (timm's 6-9) are concatenated to [784, 3072]. Two stages follow,
each: two transposed-attention blocks (`TABlock`: attention across the channels, each channel's 784 tokens its
vector), a 1x1 conv (3072 -> 768, then 768 -> 384) and a Swin stage (window 4: the shared SwinIR block, each layer
closed by a 3x3 conv + ReLU and added back as `scale * layer(x) + x`). Two heads give each patch a score (ReLU) and
a weight (sigmoid); `evaluation.maniqa` averages the scores of a photo's crops with those weights.

The TABlock's output is `(attn @ v).transpose(1, 2).reshape(B, C, N)` in the reference: the transpose and the
reshape do not undo each other (channels and tokens are interleaved); copied as written, since the published
weights were trained through it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.models.attention import attention_backend
from diffbody_jax.models.clip import CLIPEncoder
from diffbody_jax.models.layers import Array, Conv2D, Dtype, Precision, conv, dense
from diffbody_jax.models.swinir import SwinIRConfig, SwinTransformerBlock


@dataclasses.dataclass(frozen=True)
class MANIQAConfig:
    """pyiqa's MANIQA defaults with timm's ViT-B/8; `scale` 0.8 for the KonIQ and KADID checkpoints, 0.13 for
    PIPAL's (pyiqa's settings; the weights do not hold it)."""

    embed_dim: int = 768
    vit_heads: int = 12
    vit_mlp: int = 3072
    patch_size: int = 8
    img_size: int = 224
    feature_blocks: tuple[int, ...] = (6, 7, 8, 9)  # timm's block indices whose tokens are concatenated
    num_tab: int = 2
    depths: tuple[int, ...] = (2, 2)
    num_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    dim_mlp: int = 768
    scale: float = 0.8
    num_outputs: int = 1
    test_sample: int = 20  # crops per photo

    def __post_init__(self):
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.vit_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by vit_heads={self.vit_heads}")
        if len(self.depths) != len(self.num_heads):
            problems.append(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        for width in (self.embed_dim, self.embed_dim // 2):  # the shared Swin block takes a ratio
            if int(width * (self.dim_mlp / width)) != self.dim_mlp:
                problems.append(f"dim_mlp={self.dim_mlp} is not width x ratio in floating point for width {width}")
        if problems:
            raise ValueError("MANIQAConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class _Module(nn.Module):
    config: MANIQAConfig = MANIQAConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"

    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    attention_backend=self.attention_backend)


class ViTFeatures(_Module):
    """timm's ViT up to the last feature block: [N, S, S, 3] -> [N, (S/p)^2, D * len(feature_blocks)]."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        p = c.patch_size
        x = Conv2D(c.embed_dim, (p, p), (p, p), ((0, 0), (0, 0)), name="patch_embed")(x)
        n = x.shape[0]
        x = x.reshape(n, -1, c.embed_dim)
        # the reference's shapes ([1, 1, D], [1, 1 + P, D]), so that its checkpoints map by name
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c.embed_dim))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, c.grid ** 2 + 1, c.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c.embed_dim)), x], axis=1) + pos
        _, hidden = CLIPEncoder(num_layers=max(c.feature_blocks) + 1, heads=c.vit_heads, intermediate_size=c.vit_mlp,
                                hidden_act="gelu", eps=1e-6, attention_backend=self.attention_backend,
                                name="encoder")(x)
        return jnp.concatenate([hidden[i + 1][:, 1:] for i in c.feature_blocks], axis=-1)


class TABlock(_Module):
    """Attention across channels: x [N, C, T] (each channel a vector of its T tokens) -> [N, C, T]."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, c, t = x.shape
        q, k, v = (dense(self, t, name)(x)[:, :, None, :] for name in ("c_q", "c_k", "c_v"))  # one head of width T
        out = attention_backend(self.attention_backend)(q, k, v)[:, :, 0]  # softmax(q k^T / sqrt(T)) v
        return jnp.transpose(out, (0, 2, 1)).reshape(n, c, t) + x  # the reference's interleaving (module docstring)


class SwinLayer(_Module):
    """maniqa_swin's BasicLayer: `depth` Swin blocks (every second shifted), then a 3x3 conv and ReLU.
    x: [N, H, W, C]."""

    width: int = 768
    index: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        heads = c.num_heads[self.index]
        swin = SwinIRConfig(img_size=x.shape[1], embed_dim=self.width, window_size=c.window_size,
                            mlp_ratio=c.dim_mlp / self.width, depths=c.depths, num_heads=(heads,) * len(c.depths),
                            drop_path_rate=0.0)
        for j in range(c.depths[self.index]):
            x = SwinTransformerBlock(swin, **self.kw(), num_heads=heads, shift=c.window_size // 2 if j % 2 else 0,
                                     name=f"blocks_{j}")(x)
        return nn.relu(conv(self, self.width, 3, "conv")(x))


class SwinStage(_Module):
    """maniqa_swin's SwinTransformer: x <- scale * layer(x) + x per layer. x: [N, H, W, C]."""

    width: int = 768

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(len(self.config.depths)):
            x = self.config.scale * SwinLayer(self.config, **self.kw(), width=self.width, index=i,
                                              name=f"layers_{i}")(x) + x
        return x


class MANIQA(_Module):
    """crops [N, S, S, 3], normalised to [-1, 1] -> (per-patch scores, per-patch weights), each [N, (S/p)^2]."""

    @nn.compact
    def __call__(self, crops: Array) -> tuple[Array, Array]:
        c, kw = self.config, dict(config=self.config, **self.kw())
        n, g, d = crops.shape[0], c.grid, c.embed_dim
        x = jnp.transpose(ViTFeatures(**kw, name="vit")(crops), (0, 2, 1))  # [N, 4D, g*g]
        for stage, width in enumerate((d, d // 2), start=1):
            for i in range(c.num_tab):
                x = TABlock(**kw, name=f"tablock{stage}_{i}")(x)
            x = jnp.transpose(x, (0, 2, 1)).reshape(n, g, g, -1)
            x = conv(self, width, 1, f"conv{stage}")(x)
            x = SwinStage(**kw, width=width, name=f"swintransformer{stage}")(x)
            x = jnp.transpose(x.reshape(n, g * g, width), (0, 2, 1))
        x = jnp.transpose(x, (0, 2, 1))  # [N, g*g, D/2]

        def head(name, last):
            h = nn.relu(dense(self, d // 2, f"{name}_0")(x))
            return last(dense(self, c.num_outputs, f"{name}_3")(h)).reshape(n, -1)

        return head("fc_score", nn.relu), head("fc_weight", jax.nn.sigmoid)


def init_shapes(config: MANIQAConfig = MANIQAConfig()):
    """The params' shapes, without memory."""
    crops = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: MANIQA(config).init(jax.random.key(0), x), crops)["params"]
