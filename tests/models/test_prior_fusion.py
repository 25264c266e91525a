"""Stage 2's fused condition: PriorFusion inside an SDXL-layout ControlNet."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.interop.unet import controlnet_table
from diffbody_jax.models.controlnet import (
    ConditioningEmbedding,
    ControlNetConfig,
    ControlNetModel,
    prior_fusion_from_controlnet,
)
from diffbody_jax.models.prior_fusion import PriorFusion, PriorFusionConfig, prior_alphas
from tests.torch_ref import controlnet_diffusers_config, needs_torch, optional, state_dict_numpy, torch_controlnet

torch = optional("torch")

PRIORS = ("ir", "pose", "depth", "normal")


def fusion_config(**fields) -> ControlNetConfig:
    return ControlNetConfig.from_dict({**controlnet_diffusers_config("tiny-v2-stage2"), **fields})


@pytest.fixture(scope="module")
def trained():
    """A pixel ControlNet with random (non-zero) weights everywhere, as a trained one would have."""
    cfg = controlnet_diffusers_config("tiny-sdxl")
    ref = torch_controlnet(cfg, seed=4)
    module = ControlNetModel(ControlNetConfig.from_dict(cfg))
    params = torch_to_flax(state_dict_numpy(ref), controlnet_table(module.config), module.param_shapes(), "ref")
    return ref, module, params


def _inputs(seed, batch=2, size=8, cross=32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    priors = {n: f(batch, 8 * size, 8 * size, 3) for n in PRIORS}
    extra = dict(text_embeds=f(batch, 16), time_ids=jnp.asarray(rng.uniform(0, 1024, (batch, 6)), jnp.float32))
    return f(batch, size, size, 4), jnp.asarray(rng.integers(0, 1000, batch)), f(batch, 3, cross), priors, extra


@needs_torch
def test_one_hot_alpha_on_ir_is_the_source_controlnet_exactly(trained, caplog):
    _, pixel, pixel_params = trained
    fusion = ControlNetModel(fusion_config(fusion_alpha_mode="fixed", fusion_alphas=[1.0, 0.0, 0.0, 0.0]))
    with caplog.at_level(logging.INFO):
        params, copied = prior_fusion_from_controlnet(pixel_params, fusion, jax.random.key(0))
    assert "copy of its conditioning embedding" in caplog.text
    assert all(f"controlnet_cond_embedding/{n}/conv_out/kernel" in copied for n in PRIORS)
    sample, t, ctx, priors, extra = _inputs(0)
    want = pixel.apply({"params": pixel_params}, sample, t, ctx, priors["ir"], **extra)
    got = fusion.apply({"params": params}, sample, t, ctx, priors, **extra)
    for a, b in zip(got.down + (got.mid,), want.down + (want.mid,), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(want.mid).max()) > 0.1  # the residuals are not trivially zero


def _embeddings(module_cfg: PriorFusionConfig, params, priors):
    out = {}
    for n in module_cfg.priors:
        emb = ConditioningEmbedding(32, module_cfg.embedding_channels, "pixel")
        out[n] = emb.apply({"params": params[n]}, priors[n])
    return out


@needs_torch
@pytest.mark.parametrize("mode", ["softmax", "learned", "fixed"])
def test_dropping_a_prior_follows_the_rule(trained, mode):
    alphas = [0.4, 0.3, 0.2, 0.1]
    fusion = ControlNetModel(fusion_config(fusion_alpha_mode=mode, fusion_alphas=alphas))
    params, _ = prior_fusion_from_controlnet(trained[2], fusion, jax.random.key(1))
    emb_params = params["controlnet_cond_embedding"]
    cfg = fusion.config.prior_fusion
    module = PriorFusion(cfg, 32)
    _, _, _, priors, _ = _inputs(1)
    feats = _embeddings(cfg, emb_params, priors)

    full = module.apply({"params": emb_params}, priors)
    np.testing.assert_allclose(full, sum(a * feats[n] for a, n in zip(alphas, PRIORS, strict=True)), atol=1e-5)

    dropped = module.apply({"params": emb_params}, {**priors, "depth": None})
    present = [0, 1, 3]
    w = np.asarray(alphas)[present]
    w = w / w.sum() if mode == "softmax" else w  # softmax renormalises over the present priors
    want = sum(wi * feats[PRIORS[i]] for wi, i in zip(w, present, strict=True))
    np.testing.assert_allclose(dropped, want, atol=1e-5)
    # not given at all is the same as None
    three = {n: priors[n] for n in ("ir", "pose", "normal")}
    np.testing.assert_array_equal(module.apply({"params": emb_params}, three), dropped)
    # per-example: example 0 lacks depth, example 1 has everything
    mask = jnp.array([[1, 1, 0, 1], [1, 1, 1, 1]], jnp.float32)
    per = module.apply({"params": emb_params}, priors, mask)
    np.testing.assert_allclose(per[0], dropped[0], atol=1e-5)
    np.testing.assert_allclose(per[1], full[1], atol=1e-5)


@needs_torch
def test_zeros_rule_feeds_a_zero_map(trained):
    fusion = ControlNetModel(fusion_config(missing_prior="zeros"))
    params, _ = prior_fusion_from_controlnet(trained[2], fusion, jax.random.key(1))
    emb_params = params["controlnet_cond_embedding"]
    module = PriorFusion(fusion.config.prior_fusion, 32)
    _, _, _, priors, _ = _inputs(2)
    zeros = {**priors, "normal": jnp.zeros_like(priors["normal"])}
    got = module.apply({"params": emb_params}, {**priors, "normal": None})
    np.testing.assert_array_equal(got, module.apply({"params": emb_params}, zeros))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    per = module.apply({"params": emb_params}, priors, mask)
    np.testing.assert_allclose(per[0], got[0], atol=1e-6)
    np.testing.assert_allclose(per[1], module.apply({"params": emb_params}, priors)[1], atol=1e-6)


@needs_torch
@pytest.mark.parametrize("mode,name", [("softmax", "alpha_logits"), ("learned", "alpha")])
def test_learned_alphas_receive_gradients(trained, mode, name):
    """At the fusion itself (the gradient through the whole ControlNet is in test_stage2, marked slow)."""
    fusion = ControlNetModel(fusion_config(fusion_alpha_mode=mode))
    params, _ = prior_fusion_from_controlnet(trained[2], fusion, jax.random.key(2))
    module = PriorFusion(fusion.config.prior_fusion, 32)
    _, _, _, priors, _ = _inputs(3)
    target = jax.random.normal(jax.random.key(4), (2, 8, 8, 32))

    def loss(p):
        return jnp.sum((module.apply({"params": p}, priors) - target) ** 2)

    emb = params["controlnet_cond_embedding"]
    grads = jax.jit(jax.grad(loss))(emb)
    g = np.asarray(grads[name])
    assert g.shape == (4,) and np.all(np.isfinite(g)) and np.all(np.abs(g) > 0), g
    assert fusion.fusion_alphas(params) == pytest.approx(dict.fromkeys(PRIORS, 0.25))
    moved = dict(params, controlnet_cond_embedding=jax.tree.map(lambda p, gr: p - 0.01 * gr, emb, grads))
    assert fusion.fusion_alphas(moved) != pytest.approx(dict.fromkeys(PRIORS, 0.25))
    if mode == "softmax":
        assert sum(fusion.fusion_alphas(moved).values()) == pytest.approx(1.0)


def test_fixed_alphas_have_no_params():
    fusion = ControlNetModel(fusion_config(fusion_alpha_mode="fixed", fusion_alphas=[1, 2, 3, 4]))
    emb = fusion.init_params(jax.random.key(0))["controlnet_cond_embedding"]
    assert set(emb) == set(PRIORS)
    assert prior_alphas(fusion.config.prior_fusion) == {"ir": 1, "pose": 2, "depth": 3, "normal": 4}


@needs_torch
def test_configurable_prior_list_and_channels(trained):
    """A prior can be dropped from or added to the list; channels per prior (a 1-channel depth map)."""
    cfg = fusion_config(prior_names=["ir", "pose", "depth", "normal", "seg"], prior_channels=[3, 3, 1, 3, 5],
                        fusion_alphas=[0.2] * 5)
    fusion = ControlNetModel(cfg)
    params, _ = prior_fusion_from_controlnet(trained[2], fusion, jax.random.key(0))
    k = params["controlnet_cond_embedding"]["depth"]["conv_in"]["kernel"]
    src = trained[2]["controlnet_cond_embedding"]["conv_in"]["kernel"]
    np.testing.assert_allclose(k, np.asarray(src).sum(axis=2, keepdims=True))  # = the map repeated on 3 channels
    np.testing.assert_array_equal(params["controlnet_cond_embedding"]["seg"]["conv_in"]["kernel"][:, :, 3:], 0)
    sample, t, ctx, priors, extra = _inputs(4)
    priors = {"ir": priors["ir"], "depth": priors["depth"][..., :1], "seg": jnp.ones(priors["ir"].shape[:3] + (5,))}
    out = fusion.apply({"params": params}, sample, t, ctx, priors, **extra)
    assert out.mid.shape == (2, 2, 2, 96)
    two = ControlNetModel(fusion_config(prior_names=["ir", "pose"], fusion_alphas=[0.5, 0.5]))
    assert set(two.init_params(jax.random.key(0))["controlnet_cond_embedding"]) == {"ir", "pose", "alpha_logits"}


def test_bad_priors_are_named():
    fusion = ControlNetModel(fusion_config())
    params = fusion.init_params(jax.random.key(0))
    sample, t, ctx, priors, extra = _inputs(5)
    with pytest.raises(ValueError, match="prior 'pose'.*64x64"):
        fusion.apply({"params": params}, sample, t, ctx, {**priors, "pose": priors["pose"][:, :32]}, **extra)
    with pytest.raises(ValueError, match="unknown priors \\['hands'\\]"):
        fusion.apply({"params": params}, sample, t, ctx, {**priors, "hands": priors["ir"]}, **extra)
    with pytest.raises(ValueError, match="prior 'depth'.*3\\]"):
        fusion.apply({"params": params}, sample, t, ctx, {**priors, "depth": priors["depth"][..., :1]}, **extra)
    with pytest.raises(ValueError, match="takes a dict"):
        fusion.apply({"params": params}, sample, t, ctx, priors["ir"], **extra)
    with pytest.raises(ValueError, match="prior_mask: expected \\[2, 4\\]"):
        fusion.apply({"params": params}, sample, t, ctx, priors, prior_mask=jnp.ones((2, 3)), **extra)
    with pytest.raises(ValueError, match="alphas must be > 0"):
        fusion_config(fusion_alphas=[1, 0, 0, 0])
    with pytest.raises(ValueError, match="need 4 channels and 4 alphas"):
        fusion_config(fusion_alphas=[0.5, 0.5])


