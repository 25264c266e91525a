"""UNet2DConditionModel: parity with diffusers on tiny random configs, config handling, bf16, remat."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.interop.unet import unet_table
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import (
    REPO,
    nchw_to_nhwc,
    needs_torch,
    nhwc_to_nchw,
    optional,
    randomize_,
    state_dict_numpy,
    unet_diffusers_config,
)

torch = optional("torch")
diffusers = optional("diffusers")

TOL = 1e-4  # fp32 max abs error; outputs have std ~0.3-1, so this is not scaled


def _pair(variant, seed=0):
    cfg = unet_diffusers_config(variant)
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    randomize_(ref, seed)
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    params = torch_to_flax(state_dict_numpy(ref), unet_table(ours.config), ours.param_shapes(), variant)
    return ref, ours, params


def _inputs(cfg: UNetConfig, batch, h, w, rng):
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ctx = rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    added = {}
    if cfg.addition_embed_type == "text_time":
        added = dict(
            text_embeds=rng.standard_normal((batch, cfg.text_embeds_dim)).astype(np.float32),
            time_ids=np.concatenate([rng.integers(256, 1024, (batch, 2)), rng.integers(0, 64, (batch, 2)),
                                     rng.integers(256, 1024, (batch, 2))], axis=1).astype(np.float32),
        )
    return x, t, ctx, added


def _run_torch(ref, x, t, ctx, added, down=None, mid=None):
    kw = {}
    if added:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    if down is not None:
        kw["down_block_additional_residuals"] = tuple(torch.from_numpy(d) for d in down)
        kw["mid_block_additional_residual"] = torch.from_numpy(mid)
    with torch.no_grad():
        return ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample.numpy()


def _run_ours(ours, params, x, t, ctx, added, down=None, mid=None):
    kw = {k: jnp.asarray(v) for k, v in added.items()}
    if down is not None:
        kw["down_residuals"] = [jnp.asarray(nchw_to_nhwc(d)) for d in down]
        kw["mid_residual"] = jnp.asarray(nchw_to_nhwc(mid))
    fn = jax.jit(lambda p, x, t, c, kw: ours.apply({"params": p}, x, t, c, **kw))
    return nhwc_to_nchw(fn(params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx), kw))


@needs_torch
@pytest.mark.parametrize("variant,size", [("tiny-sd21", (16, 16)), ("tiny-sdxl", (16, 8)), ("tiny-sd21", (12, 10))])
def test_parity_with_diffusers(variant, size, rng):
    ref, ours, params = _pair(variant)
    x, t, ctx, added = _inputs(ours.config, 2, *size, rng)
    want = _run_torch(ref, x, t, ctx, added)
    got = _run_ours(ours, params, x, t, ctx, added)
    assert got.shape == want.shape
    assert want.std() > 0.1
    assert np.abs(got - want).max() <= TOL


@needs_torch
def test_parity_extra_channels_controlnet_residuals_odd_size(rng):
    """tiny-cond: 9 input channels, conv projections, upcast, per-block layers, 10x6 latents (not a
    multiple of 4, so the up path uses size-forced nearest upsampling), ControlNet residuals."""
    ref, ours, params = _pair("tiny-cond", seed=5)
    x, t, ctx, added = _inputs(ours.config, 2, 10, 6, rng)
    # Shapes of every skip and of the mid output, read off diffusers' own forward (hooks fire in order:
    # conv_in, each down block's (x, skips), the mid block).
    outputs = []
    modules = [ref.conv_in, *ref.down_blocks, ref.mid_block]
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in modules]
    _run_torch(ref, x, t, ctx, added)
    for h in handles:
        h.remove()
    conv_in, *blocks, mid = outputs
    skip_shapes = [tuple(conv_in.shape)] + [tuple(s.shape) for _, skips in blocks for s in skips]
    down = [rng.standard_normal(s).astype(np.float32) for s in skip_shapes]
    mid_res = rng.standard_normal(tuple(mid.shape)).astype(np.float32)
    want = _run_torch(ref, x, t, ctx, added, down, mid_res)
    plain = _run_torch(ref, x, t, ctx, added)
    assert np.abs(want - plain).max() > 0.1  # the residuals matter
    got = _run_ours(ours, params, x, t, ctx, added, down, mid_res)
    assert np.abs(got - want).max() <= TOL


def test_heads_read_from_attention_head_dim():
    cfg = UNetConfig.from_dict(json.loads((REPO / "configs/diffusers/sd21-base/unet/config.json").read_text()))
    assert cfg.heads == (5, 10, 20, 20)
    assert [c // h for c, h in zip(cfg.block_out_channels, cfg.heads, strict=True)] == [64, 64, 64, 64]
    xl = UNetConfig.from_dict(json.loads((REPO / "configs/diffusers/sdxl-base/unet/config.json").read_text()))
    assert xl.transformer_depths == (1, 2, 10) and xl.up_transformer_depths == (10, 2, 1)
    assert xl.text_embeds_dim == 1280
    v = UNetConfig.from_dict(json.loads((REPO / "configs/diffusers/sd21-768v/unet/config.json").read_text()))
    assert v.upcast_attention and v.sample_size == 96


def test_config_refuses_unsupported_fields_by_name():
    base = unet_diffusers_config("tiny-sd21")
    pattern = r"my/unet/config.json: .*class_embed_type='timestep'.*made_up_field \(unknown"
    with pytest.raises(ValueError, match=pattern):
        UNetConfig.from_dict({**base, "class_embed_type": "timestep", "made_up_field": 1}, "my/unet/config.json")
    with pytest.raises(ValueError, match="num_attention_heads must be null"):
        UNetConfig.from_dict({**base, "num_attention_heads": [2, 4, 4]})
    with pytest.raises(ValueError, match="unsupported block types.*SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3})
    with pytest.raises(ValueError, match="cannot be split into 5 attention heads"):
        UNetConfig.from_dict({**base, "attention_head_dim": [5, 4, 4]})
    # Fields at their "off" value and provenance fields are accepted.
    UNetConfig.from_dict({**base, "dual_cross_attention": False, "_diffusers_version": "0.10.0"})


@needs_torch
def test_config_round_trips_through_diffusers_dict():
    for variant in ("tiny-sdxl", "tiny-cond"):
        cfg = UNetConfig.from_dict(unet_diffusers_config(variant))
        again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
        diffusers.UNet2DConditionModel.from_config(cfg.to_dict())  # diffusers accepts what we write


@needs_torch
def test_bf16_close_to_fp32(rng):
    _, ours, params = _pair("tiny-sdxl", seed=7)
    x, t, ctx, added = _inputs(ours.config, 2, 16, 16, rng)
    ref = _run_ours(ours, params, x, t, ctx, added)
    bf16 = UNet2DConditionModel(ours.config, dtype=jnp.bfloat16)
    got = _run_ours(bf16, params, x, t, ctx, added).astype(np.float32)
    assert np.isfinite(got).all()
    # Measured over 6 seeds (tiny-sd21, tiny-sdxl): max abs error 0.056-0.073 x output std, mean abs
    # error 0.011-0.015 x std. Bounds: twice that.
    err = np.abs(got - ref)
    assert err.max() <= 0.15 * ref.std(), err.max()
    assert err.mean() <= 0.03 * ref.std(), err.mean()


@needs_torch
def test_remat_changes_nothing_numerically(rng):
    _, ours, params = _pair("tiny-sd21", seed=8)
    x, t, ctx, added = _inputs(ours.config, 1, 8, 8, rng)
    remat = UNet2DConditionModel(ours.config, remat=True)

    def loss(model, p):
        out = model.apply({"params": p}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx))
        return jnp.mean(out**2)

    g_plain = jax.jit(jax.grad(lambda p: loss(ours, p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), g_plain, g_remat))
    assert max(float(d) for d in diffs) <= 1e-6


@needs_torch
def test_wrong_residual_count_is_named(rng):
    _, ours, params = _pair("tiny-sd21")
    x, t, ctx, _ = _inputs(ours.config, 1, 8, 8, rng)
    with pytest.raises(ValueError, match=r"down_residuals: expected 6 tensors \(one per skip\), got 2"):
        ours.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), t, ctx, down_residuals=[x, x], mid_residual=x)


@needs_torch
def test_text_time_inputs_required(rng):
    _, ours, params = _pair("tiny-sdxl")
    x, t, ctx, _ = _inputs(ours.config, 1, 8, 8, rng)
    with pytest.raises(ValueError, match="text_embeds"):
        ours.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), t, ctx)


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd21-768v"])
def test_real_size_parity(variant, rng):
    """The real SD2.1 UNet (866M params, upcast attention) with diffusers' default random init, at 16x16
    latents (measured: max abs error 4.4e-6 on outputs of std 0.3)."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**unet_diffusers_config(variant)).eval()
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    params = torch_to_flax(state_dict_numpy(ref), unet_table(ours.config), ours.param_shapes(), variant)
    x, t, ctx, added = _inputs(ours.config, 1, 16, 16, rng)
    want = _run_torch(ref, x, t, ctx, added)
    got = _run_ours(ours, params, x, t, ctx, added)
    err = np.abs(got - want).max()
    print(f"{variant}: max abs error {err:.2e}, output std {want.std():.3f}")
    assert err <= TOL
