"""DiffBody v2 stage 2's fused condition (seed 002, Sec. 3.3): c_g = sum_i alpha_i F_i(prior_i).

Each prior (I_ir, I_pose, I_depth, I_normal by default; the list is configurable) has its own feature extractor
F_i, shaped like ControlNet's conditioning embedding (image resolution -> latent resolution, C_0 channels, a
zero-initialised last conv), so F_i can start as a copy of a trained ControlNet's embedding.

The weights alpha_i are, by `alpha_mode`:
  "fixed"    the configured numbers, not trained;
  "learned"  trained scalars, initialised to the configured numbers (param `alpha` [P]);
  "softmax"  trained logits (param `alpha_logits` [P], initialised to log alpha) through a softmax, so the
             weights stay positive and sum to 1.

Missing priors (`missing_prior`):
  "drop"   a prior that is absent (None or not given), or masked out for an example by `prior_mask`, loses its
           term. Under "softmax" the remaining weights are renormalised (the softmax runs over the present
           priors only); under "fixed" and "learned" they keep their values. An example with no prior at all
           gets c_g = 0.
  "zeros"  the absent prior is fed as an all-zero map (masked examples: their map is zeroed) and keeps its weight.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffbody_jax.models.conditioning_embedding import ConditioningEmbedding
from diffbody_jax.models.layers import Array, Dtype, Precision

ALPHA_MODES = ("fixed", "learned", "softmax")
MISSING_RULES = ("drop", "zeros")
DEFAULT_PRIORS = ("ir", "pose", "depth", "normal")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PriorFusionConfig:
    """The priors (names and channels), the embedding's channels, and the alpha and missing-prior rules."""

    priors: tuple[str, ...] = DEFAULT_PRIORS
    channels: tuple[int, ...] = (3, 3, 3, 3)
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    alpha_mode: str = "softmax"
    alphas: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    missing_prior: str = "drop"

    def __post_init__(self):
        p = len(self.priors)
        if not p:
            raise ValueError("prior fusion: at least one prior is needed")
        bad = [n for n in self.priors if not _NAME.match(n)]
        if bad or len(set(self.priors)) != p:
            raise ValueError(f"prior fusion: prior names must be distinct lowercase identifiers, got {self.priors}")
        if len(self.channels) != p or len(self.alphas) != p:
            raise ValueError(
                f"prior fusion: {p} priors {self.priors} need {p} channels and {p} alphas, got channels "
                f"{self.channels} and alphas {self.alphas}"
            )
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"prior fusion: alpha_mode={self.alpha_mode!r}; expected one of {ALPHA_MODES}")
        if self.missing_prior not in MISSING_RULES:
            raise ValueError(f"prior fusion: missing_prior={self.missing_prior!r}; expected one of {MISSING_RULES}")
        if self.alpha_mode == "softmax" and min(self.alphas) <= 0:
            raise ValueError(f"prior fusion: softmax logits start at log(alpha), so alphas must be > 0: {self.alphas}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.embedding_channels) - 1)


def prior_alphas(config: PriorFusionConfig, params: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The current alpha_i of every prior (all present), for logging: {name: value}.

    params: the PriorFusion module's params (a ControlNet's `controlnet_cond_embedding`); unused for "fixed".
    """
    if config.alpha_mode == "fixed":
        values = np.asarray(config.alphas, np.float64)
    elif config.alpha_mode == "learned":
        values = np.asarray(params["alpha"], np.float64)
    else:
        logits = np.asarray(params["alpha_logits"], np.float64)
        values = np.exp(logits - logits.max())
        values = values / values.sum()
    return {name: float(v) for name, v in zip(config.priors, values, strict=True)}


class PriorFusion(nn.Module):
    """priors: {name: [B, H * s, W * s, C_i] or None}, s = config.downscale; prior_mask: optional [B, P] (1 =
    present, 0 = absent for that example; order of config.priors). Returns c_g: [B, H, W, out_channels].

    Submodules are named by prior (`ir/conv_in`, ...), so adding or dropping a prior keeps the other F_i's params.
    """

    config: PriorFusionConfig
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, priors: Mapping[str, Array | None], prior_mask: Array | None = None) -> Array:
        c = self.config
        unknown = sorted(set(priors) - set(c.priors))
        if unknown:
            raise ValueError(f"prior fusion: unknown priors {unknown}; configured {c.priors}")
        given = {n: priors.get(n) for n in c.priors}
        if all(v is None for v in given.values()):
            raise ValueError(f"prior fusion: no prior given; expected some of {c.priors}")
        ref = next(v for v in given.values() if v is not None)
        batch, spatial = ref.shape[0], ref.shape[1:3]
        for (name, x), ch in zip(given.items(), c.channels, strict=True):
            if x is not None and tuple(x.shape) != (batch, *spatial, ch):
                raise ValueError(
                    f"prior {name!r}: expected [{batch}, {spatial[0]}, {spatial[1]}, {ch}] like the other priors, "
                    f"got {tuple(x.shape)}"
                )
        mask = jnp.ones((batch, len(c.priors)), jnp.float32) if prior_mask is None else jnp.asarray(
            prior_mask, jnp.float32)
        if mask.shape != (batch, len(c.priors)):
            raise ValueError(f"prior_mask: expected [{batch}, {len(c.priors)}] for priors {c.priors}, got {mask.shape}")

        features = []
        for i, (name, x) in enumerate(given.items()):
            if x is None and (c.missing_prior == "zeros" or self.is_initializing()):
                x = jnp.zeros((batch, *spatial, c.channels[i]), self.dtype)
            if x is None:
                mask = mask.at[:, i].set(0.0)
                features.append(None)
                continue
            if c.missing_prior == "zeros" and prior_mask is not None:
                x = x * mask[:, i, None, None, None].astype(x.dtype)
            embed = ConditioningEmbedding(self.out_channels, c.embedding_channels, "pixel", self.dtype,
                                          self.param_dtype, self.precision, name=name)
            features.append(embed(x.astype(self.dtype)))
        weights = self._weights(mask if c.missing_prior == "drop" else jnp.ones_like(mask))  # [B, P]
        out = None
        for i, f in enumerate(features):
            if f is not None:
                term = weights[:, i, None, None, None].astype(f.dtype) * f
                out = term if out is None else out + term
        return out

    def _weights(self, mask: Array) -> Array:
        """alpha per example and prior, [B, P], with the drop rule applied through `mask`."""
        c = self.config
        init = np.asarray(c.alphas, np.float32)
        if c.alpha_mode == "fixed":
            return jnp.asarray(init)[None, :] * mask
        if c.alpha_mode == "learned":
            alpha = self.param("alpha", nn.with_logical_partitioning(lambda key, shape: jnp.asarray(init), (None,)),
                               init.shape)
            return alpha.astype(jnp.float32)[None, :] * mask
        logits = self.param("alpha_logits",
                            nn.with_logical_partitioning(lambda key, shape: jnp.log(jnp.asarray(init)), (None,)),
                            init.shape)
        logits = jnp.where(mask > 0, logits.astype(jnp.float32)[None, :], -jnp.inf)
        any_present = jnp.any(mask > 0, axis=-1, keepdims=True)
        safe = jnp.where(any_present, logits, 0.0)
        return jnp.where(any_present, jax.nn.softmax(safe, axis=-1), 0.0) * mask

