"""CLIP text and vision transformers in Flax, in transformers' CLIP format.

Covers the encoders of the SD family: SD2.1's OpenCLIP ViT-H text tower (23 layers, gelu), SDXL's CLIP
ViT-L (quick_gelu) and OpenCLIP bigG with projection, and the ViT-H/14 image encoder of IP-Adapter.
Both towers share `CLIPEncoder`; attention is `layers.Attention` (causal for text).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffbody_jax.config import dataclass_from_dict
from diffbody_jax.models.layers import MLP, Array, Attention, Dtype, Precision, constrain_tokens, dense, layer_norm
from diffbody_jax.models.variables import ModelVariables

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
# transformers' generic PretrainedConfig keys and init-only keys: none changes the forward pass.
_IGNORED = (
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "chunk_size_feed_forward",
    "id2label", "label2id", "is_encoder_decoder", "problem_type", "output_attentions", "output_hidden_states",
    "return_dict", "use_cache", "tie_word_embeddings", "initializer_factor", "initializer_range",
    "text_config_dict", "vision_config_dict",
)
_FEATURE_OFF = {"attention_dropout": (0.0,), "dropout": (0.0,)}
_IGNORED_KEPT = tuple(k for k in _IGNORED if k not in _FEATURE_OFF)


def _from_transformers(cls, config: dict[str, Any], base_arch: str, kind: str, source: str):
    """Our config from a transformers config.json dict; `architectures` decides the projection head."""
    config = dict(config)
    arch = (config.get("architectures") or [base_arch])[0]
    config["with_projection"] = arch == base_arch + "WithProjection"
    return dataclass_from_dict(cls, config, kind=kind, source=source, feature_off=_FEATURE_OFF, ignored=_IGNORED_KEPT)


def _to_transformers(obj, base_arch: str, model_type: str) -> dict[str, Any]:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "with_projection"}
    arch = base_arch + ("WithProjection" if obj.with_projection else "")
    return {"architectures": [arch], "model_type": model_type, **out}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1
    with_projection: bool = False  # CLIPTextModelWithProjection: a text_projection on the pooled output

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIP text config: hidden_act={self.hidden_act!r} not supported; use {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> CLIPTextConfig:
        return _from_transformers(cls, config, "CLIPTextModel", "CLIP text", source)

    def to_dict(self) -> dict[str, Any]:
        return _to_transformers(self, "CLIPTextModel", "clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False  # CLIPVisionModelWithProjection: a visual_projection on the pooled output

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> CLIPVisionConfig:
        return _from_transformers(cls, config, "CLIPVisionModel", "CLIP vision", source)

    def to_dict(self) -> dict[str, Any]:
        return _to_transformers(self, "CLIPVisionModel", "clip_vision_model")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class _CLIPBase(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"

    def kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


class _CLIPModel(ModelVariables, nn.Module):
    """A top-level tower: `config` first, so that `CLIPTextModel(config, dtype=...)` reads naturally."""

    config: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    attention_backend: str = "einsum"

    def kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        raise NotImplementedError

    def _encoder(self, causal: bool) -> nn.Module:
        c = self.config
        return CLIPEncoder(
            num_layers=c.num_hidden_layers, heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
            hidden_act=c.hidden_act, eps=c.layer_norm_eps, causal=causal, attention_backend=self.attention_backend,
            name="encoder", **self.kw(),
        )

class CLIPEncoderLayer(_CLIPBase):
    """Pre-norm attention and MLP blocks, each residual. x: [B, T, D] -> [B, T, D]."""

    heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        attn = Attention(self.heads, d // self.heads, d, qkv_bias=True, causal=self.causal,
                         backend=self.attention_backend, name="self_attn", **self.kw())
        x = x + attn(layer_norm(self, self.eps, "layer_norm1")(x))
        mlp = MLP(self.intermediate_size, ACTIVATIONS[self.hidden_act], name="mlp", **self.kw())
        return constrain_tokens(x + mlp(layer_norm(self, self.eps, "layer_norm2")(x)))


class CLIPEncoder(_CLIPBase):
    """`num_layers` encoder layers. x: [B, T, D]; returns (x, hidden_states), hidden_states[0] = input and
    hidden_states[i] = output of layer i, as transformers' `output_hidden_states`."""

    num_layers: int = 12
    heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, tuple[Array, ...]]:
        hidden = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                heads=self.heads, intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
                eps=self.eps, causal=self.causal, attention_backend=self.attention_backend, name=f"layers_{i}",
                **self.kw(),
            )(x)
            hidden.append(x)
        return x, tuple(hidden)


def _embed(m: nn.Module, num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=m.dtype, param_dtype=m.param_dtype,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                    name=name)


class CLIPTextEmbeddings(_CLIPBase):
    config: CLIPTextConfig = CLIPTextConfig()

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None]
        tokens = _embed(self, c.vocab_size, c.hidden_size, "token_embedding")(input_ids)
        return tokens + _embed(self, c.max_position_embeddings, c.hidden_size, "position_embedding")(positions)


class CLIPTextModel(_CLIPModel):
    """CLIP text transformer (with an optional projection: CLIPTextModelWithProjection)."""

    @nn.compact
    def __call__(self, input_ids: Array) -> dict[str, Any]:
        """input_ids: [B, T] int token ids (T <= max_position_embeddings). Returns a dict:
        last_hidden_state [B, T, D] (after the final layer norm), hidden_states (T+1 tensors [B, T, D],
        before the final norm; hidden_states[-2] is what SDXL reads), pooled [B, D] (last_hidden_state at
        the EOS token), and text_embeds [B, projection_dim] when `with_projection`.
        """
        c = self.config
        x = CLIPTextEmbeddings(config=c, name="embeddings", **self.kw())(input_ids)
        x, hidden = self._encoder(causal=True)(x)
        last = layer_norm(self, c.layer_norm_eps, "final_layer_norm")(x)
        if c.eos_token_id == 2:
            # Configs written before transformers fixed eos_token_id pool at the highest token id
            # (the EOS of the original vocab); transformers keeps that rule for them.
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]
        out = {"last_hidden_state": last, "hidden_states": hidden, "pooled": pooled}
        if c.with_projection:
            out["text_embeds"] = dense(self, c.projection_dim, "text_projection", use_bias=False)(pooled)
        return out

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        return {"input_ids": jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32)}


class CLIPVisionEmbeddings(_CLIPBase):
    config: CLIPVisionConfig = CLIPVisionConfig()

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        c = self.config
        p = c.patch_size
        patches = nn.Conv(  # CLIP's patch conv has no bias
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, "conv_in", "embed")),
        )(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (c.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        positions = jnp.arange(x.shape[1])[None]
        return x + _embed(self, c.num_positions, c.hidden_size, "position_embedding")(positions)


class CLIPVisionModel(_CLIPModel):
    """CLIP vision transformer (with an optional projection: CLIPVisionModelWithProjection)."""

    @nn.compact
    def __call__(self, pixel_values: Array) -> dict[str, Any]:
        """pixel_values: [B, H, W, C] normalised images, NHWC (H = W = image_size). Returns a dict:
        last_hidden_state [B, 1 + P, D], hidden_states (layers + 1 tensors; hidden_states[-2] is what
        IP-Adapter-Plus reads), pooled [B, D] (post-layernormed CLS token), image_embeds
        [B, projection_dim] when `with_projection`.
        """
        c = self.config
        x = CLIPVisionEmbeddings(config=c, name="embeddings", **self.kw())(pixel_values)
        x = layer_norm(self, c.layer_norm_eps, "pre_layrnorm")(x)  # sic: transformers' spelling
        x, hidden = self._encoder(causal=False)(x)
        pooled = layer_norm(self, c.layer_norm_eps, "post_layernorm")(x[:, 0])
        out = {"last_hidden_state": x, "hidden_states": hidden, "pooled": pooled}
        if c.with_projection:
            out["image_embeds"] = dense(self, c.projection_dim, "visual_projection", use_bias=False)(pooled)
        return out

    def dummy_inputs(self, batch: int = 1) -> dict[str, Array]:
        c = self.config
        return {"pixel_values": jnp.zeros((batch, c.image_size, c.image_size, c.num_channels), self.dtype)}
