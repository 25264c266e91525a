"""DiffBody v2's colour adapter: IP-Adapter-Plus (Ye et al. 2023) in Flax.

Two halves, as in IP-Adapter-Plus-XL, from which the adapter is initialised:

  `Resampler`  a Perceiver over CLIP ViT-H/14 penultimate hidden states [B, 257, 1280] of I_res: learned
               latent queries attend to (image features ++ queries) in each layer, then a feed-forward;
               projected to the UNet's cross-attention width and layer-normed: image tokens c'_i [B, 16, 2048].
  `to_k_ip`, `to_v_ip`  a second key/value pair in every cross-attention of the UNet
               (`UNet2DConditionModel(ip_adapter=True)`), decoupled cross-attention over the image tokens.

Param names follow diffusers' `IPAdapterPlusImageProjection` (layers_i/ln0, ln1, attn, ff_0, ff_1);
`diffbody_jax.interop.ip_adapter` reads and writes both that layout and the original file's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from diffbody_jax.config import dataclass_from_dict, dataclass_to_dict
from diffbody_jax.models.layers import Array, Attention, Dtype, GELUFeedForward, Precision, dense, layer_norm
from diffbody_jax.models.variables import ModelVariables

IP_KERNELS = ("to_k_ip", "to_v_ip")


def is_ip_kernel_path(path: str) -> bool:
    """Whether a flat UNet param path ("down_blocks_1/.../attn2/to_k_ip/kernel") is an adapter kernel."""
    return any(f"/{name}/" in f"/{path}" for name in IP_KERNELS)


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver Resampler; field names of diffusers' `IPAdapterPlusImageProjection`.

    Defaults are IP-Adapter-Plus-XL's: 16 queries of width 1280, 4 layers of 20 heads of 64, feed-forward x4,
    CLIP ViT-H/14 features (1280) in, SDXL's cross-attention width (2048) out.
    """

    embed_dims: int = 1280  # width of the image features (CLIP vision hidden size)
    output_dims: int = 2048  # the UNet's cross_attention_dim
    hidden_dims: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16
    ffn_ratio: int = 4

    def __post_init__(self):
        for name in ("embed_dims", "output_dims", "hidden_dims", "depth", "dim_head", "heads", "num_queries",
                     "ffn_ratio"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Resampler config: {name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self, "IPAdapterPlusImageProjection")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ResamplerConfig:
        return dataclass_from_dict(cls, dict(d), kind="Resampler", source=source)


class PerceiverBlock(nn.Module):
    """One Resampler layer. latents: [B, Q, D] queries; x: [B, T, D] image features; returns [B, Q, D].

    The queries attend to LayerNorm(x) ++ LayerNorm(latents) (keys from both, as the Perceiver), residual;
    then a pre-norm bias-free GELU feed-forward, residual.
    """

    heads: int
    dim_head: int
    ffn_ratio: int = 4
    attention_backend: str = "einsum"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array, latents: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        d = latents.shape[-1]
        queries = layer_norm(self, 1e-5, "ln1")(latents)
        context = jnp.concatenate([layer_norm(self, 1e-5, "ln0")(x), queries], axis=1)
        attn = Attention(self.heads, self.dim_head, d, out_bias=False, backend=self.attention_backend, name="attn",
                         **kw)
        latents = latents + attn(queries, context)
        ff = GELUFeedForward(self.ffn_ratio, use_bias=False, name="ff_1", **kw)
        return latents + ff(layer_norm(self, 1e-5, "ff_0")(latents))


class Resampler(ModelVariables, nn.Module):
    """IP-Adapter-Plus image projection. image_features: [B, T, embed_dims] (CLIP vision penultimate
    hidden states) -> image tokens [B, num_queries, output_dims] for the UNet's cross-attentions.
    """

    config: ResamplerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"

    @nn.compact
    def __call__(self, image_features: Array) -> Array:
        c = self.config
        if image_features.ndim != 3 or image_features.shape[-1] != c.embed_dims:
            raise ValueError(
                f"Resampler: image_features must be [B, T, {c.embed_dims}] (CLIP vision hidden states), "
                f"got {tuple(image_features.shape)}"
            )
        init = nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * c.hidden_dims**-0.5,
            (None, None, "embed"),
        )
        latents = self.param("latents", init, (1, c.num_queries, c.hidden_dims), self.param_dtype)
        x = dense(self, c.hidden_dims, "proj_in", (None, "embed"))(image_features.astype(self.dtype))
        latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
        for i in range(c.depth):
            latents = PerceiverBlock(
                c.heads, c.dim_head, c.ffn_ratio, self.attention_backend, self.dtype, self.param_dtype, self.precision,
                name=f"layers_{i}",
            )(x, latents)
        out = dense(self, c.output_dims, "proj_out", ("mlp", "embed"))(latents)
        return layer_norm(self, 1e-5, "norm_out")(out)

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        return {"image_features": jnp.zeros((batch, 2, self.config.embed_dims), self.dtype)}

# ------------------------------------------------------------------- the adapter's half of the UNet
def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(meta.unbox(dict(tree)), sep="/")


def ip_adapter_of(unet_params: Mapping[str, Any]) -> dict:
    """The to_k_ip / to_v_ip kernels of a UNet's params, as a tree of the same nesting."""
    flat = _flat(unet_params)
    keep = {k: v for k, v in flat.items() if k.split("/")[-2] in IP_KERNELS}
    return traverse_util.unflatten_dict(keep, sep="/")


def without_ip_adapter(unet_params: Mapping[str, Any]) -> dict:
    """A UNet's params without its to_k_ip / to_v_ip kernels: the params of the same UNet built plainly."""
    flat = {k: v for k, v in _flat(unet_params).items() if k.split("/")[-2] not in IP_KERNELS}
    return traverse_util.unflatten_dict(flat, sep="/")


def with_ip_adapter(unet_params: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """A plain UNet's params plus the adapter's kernels (`adapter["ip_adapter"]` or that subtree itself):
    the params of the same UNet built with `ip_adapter=True`. Existing kernels are replaced."""
    ip = adapter.get("ip_adapter", adapter)
    flat = _flat(without_ip_adapter(unet_params))
    for path, value in _flat(ip).items():
        if path.rsplit("/", 2)[0] + "/to_q/kernel" not in flat:
            raise ValueError(f"IP-Adapter kernel {path} has no cross-attention in the UNet params")
        flat[path] = value
    return traverse_util.unflatten_dict(flat, sep="/")
