"""ControlNetModel: parity with diffusers (pixel conditions) and with a twin (latent conditions), UNet + ControlNet
end to end, initialisation from a UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop.mapping import flax_to_torch, torch_to_flax
from diffbody_jax.interop.unet import controlnet_table, unet_table
from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet, sum_residuals
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import (
    controlnet_diffusers_config,
    nchw_to_nhwc,
    needs_torch,
    nhwc_to_nchw,
    optional,
    randomize_,
    state_dict_numpy,
    torch_controlnet,
    unet_diffusers_config,
)

torch = optional("torch")
diffusers = optional("diffusers")

TOL = 1e-4  # fp32 max abs error


def _pair(config: dict, seed=0):
    ref = torch_controlnet(config, seed)
    ours = ControlNetModel(ControlNetConfig.from_dict(config))
    params = torch_to_flax(state_dict_numpy(ref), controlnet_table(ours.config), ours.param_shapes(), "ref")
    return ref, ours, params


def _inputs(cfg: ControlNetConfig, batch, h, w, rng):
    s = cfg.condition_downscale
    x = rng.standard_normal((batch, cfg.unet.in_channels, h, w)).astype(np.float32)
    cond = rng.standard_normal((batch, cfg.conditioning_channels, h * s, w * s)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ctx = rng.standard_normal((batch, 7, cfg.unet.cross_attention_dim)).astype(np.float32)
    added = {}
    if cfg.unet.addition_embed_type == "text_time":
        added = dict(
            text_embeds=rng.standard_normal((batch, cfg.unet.text_embeds_dim)).astype(np.float32),
            time_ids=rng.integers(0, 1024, (batch, 6)).astype(np.float32),
        )
    return x, t, ctx, cond, added


def _run_torch(ref, x, t, ctx, cond, added, scale=1.0, guess_mode=False):
    kw = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(cond),
                        conditioning_scale=scale, guess_mode=guess_mode, return_dict=False, **kw)
    return [d.numpy() for d in down], mid.numpy()


def _run_ours(ours, params, x, t, ctx, cond, added, scale=1.0, guess_mode=False):
    fn = jax.jit(lambda p, x, t, c, cond, kw: ours.apply(
        {"params": p}, x, t, c, cond, conditioning_scale=scale, guess_mode=guess_mode, **kw))
    out = fn(params, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(nchw_to_nhwc(cond)),
             {k: jnp.asarray(v) for k, v in added.items()})
    return [nhwc_to_nchw(d) for d in out.down], nhwc_to_nchw(out.mid)


def _max_err(got, want):
    (gd, gm), (wd, wm) = got, want
    assert len(gd) == len(wd)
    for g, w in zip(gd, wd, strict=True):
        assert g.shape == w.shape
    return max([float(np.abs(g - w).max()) for g, w in zip(gd, wd, strict=True)] + [float(np.abs(gm - wm).max())])


@needs_torch
@pytest.mark.parametrize("variant,size,scale,guess", [
    ("tiny-sd21", (8, 8), 1.0, False),
    ("tiny-sdxl", (8, 4), 0.7, True),
    ("tiny-v1", (6, 10), 0.55, False),  # latent condition, odd latent size
    ("tiny-v2-stage1", (8, 8), 1.3, True),
])
def test_parity(variant, size, scale, guess, rng):
    ref, ours, params = _pair(controlnet_diffusers_config(variant), seed=1)
    args = _inputs(ours.config, 2, *size, rng)
    want = _run_torch(ref, *args, scale=scale, guess_mode=guess)
    got = _run_ours(ours, params, *args, scale=scale, guess_mode=guess)
    assert min(float(w.std()) for w in want[0]) > 0.01
    assert _max_err(got, want) <= TOL


@needs_torch
def test_parity_bgr_order_and_pooled_conditions(rng):
    config = controlnet_diffusers_config("tiny-sd21")
    config.update(controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    ref, ours, params = _pair(config, seed=2)
    args = _inputs(ours.config, 1, 8, 8, rng)
    got, want = _run_ours(ours, params, *args, guess_mode=True), _run_torch(ref, *args, guess_mode=True)
    assert got[1].shape[2:] == (1, 1)
    assert _max_err(got, want) <= TOL


@needs_torch
def test_per_example_conditioning_scale(rng):
    _, ours, params = _pair(controlnet_diffusers_config("tiny-sd21"))
    x, t, ctx, cond, _ = _inputs(ours.config, 2, 8, 8, rng)
    scales = jnp.array([0.3, 1.7])
    apply = lambda s: ours.apply({"params": params}, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond),  # noqa: E731
                                 conditioning_scale=s)
    both, one = apply(scales), apply(1.0)
    for k in range(2):
        np.testing.assert_allclose(both.mid[k], scales[k] * one.mid[k], rtol=1e-5, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("variant", ["tiny-sd21", "tiny-sdxl"])
def test_unet_plus_controlnet_end_to_end(variant, rng):
    """diffusers' UNet fed diffusers' ControlNet residuals == our UNet fed ours."""
    ref_cn, ours_cn, cn_params = _pair(controlnet_diffusers_config(variant), seed=3)
    ref_unet = diffusers.UNet2DConditionModel(**unet_diffusers_config(variant)).eval()
    randomize_(ref_unet, 4)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(ref_unet.config)))
    unet_params = torch_to_flax(state_dict_numpy(ref_unet), unet_table(unet.config), unet.param_shapes(), variant)
    x, t, ctx, cond, added = _inputs(ours_cn.config, 2, 8, 8, rng)

    tkw = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
    with torch.no_grad():
        down, mid = ref_cn(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(cond),
                           conditioning_scale=0.8, return_dict=False, **tkw)
        want = ref_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        down_block_additional_residuals=down, mid_block_additional_residual=mid, **tkw).sample.numpy()

    @jax.jit
    def ours(cn_params, unet_params, x, t, ctx, cond, kw):
        res = ours_cn.apply({"params": cn_params}, x, t, ctx, cond, conditioning_scale=0.8, **kw)
        return unet.apply({"params": unet_params}, x, t, ctx, down_residuals=res.down, mid_residual=res.mid, **kw)

    got = nhwc_to_nchw(ours(cn_params, unet_params, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond),
                            {k: jnp.asarray(v) for k, v in added.items()}))
    assert np.abs(got - want).max() <= TOL


@needs_torch
@pytest.mark.parametrize("variant", ["tiny-v1", "tiny-v2-stage1", "tiny-sdxl"])
def test_from_unet_copies_the_encoder_and_leaves_the_unet_output_unchanged(variant, rng):
    cn_config = controlnet_diffusers_config(variant)
    unet_variant = "tiny-sdxl" if variant == "tiny-sdxl" else "tiny-sd21"
    ref_unet = diffusers.UNet2DConditionModel(**unet_diffusers_config(unet_variant)).eval()
    randomize_(ref_unet, 5)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(ref_unet.config)))
    unet_params = torch_to_flax(state_dict_numpy(ref_unet), unet_table(unet.config), unet.param_shapes(), "unet")
    cn = ControlNetModel(ControlNetConfig.from_dict(cn_config))
    params, copied = controlnet_from_unet(unet_params, cn, jax.random.key(0))

    roots = {p.split("/")[0] for p in copied}
    assert roots == {"conv_in", "time_embedding", "mid_block"} | {f"down_blocks_{i}" for i in range(3)} | (
        {"add_embedding"} if variant == "tiny-sdxl" else set())

    # The copied tensors equal diffusers' from_unet copy (the pixel case diffusers can build).
    exported = flax_to_torch(params, controlnet_table(cn.config))
    if variant == "tiny-sdxl":
        ref_cn = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for key, value in state_dict_numpy(ref_cn).items():
            if not key.startswith(("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.blocks")):
                np.testing.assert_array_equal(exported[key], value, err_msg=key)
    else:  # in_channels 8 for v2 stage 1: the first 4 input channels copied, the rest zero
        kernel = exported["conv_in.weight"]
        np.testing.assert_array_equal(kernel[:, :4], state_dict_numpy(ref_unet)["conv_in.weight"])
        assert not kernel[:, 4:].any()

    # Zero output convs: the UNet's output is unchanged, bit for bit.
    x, t, ctx, cond, added = _inputs(cn.config, 2, 8, 8, rng)
    x = nchw_to_nhwc(x)
    res = cn.apply({"params": params}, x, t, ctx, nchw_to_nhwc(cond), **added)
    assert all(not np.asarray(d).any() for d in res.down) and not np.asarray(res.mid).any()
    ux = x[..., : unet.config.in_channels]
    plain = unet.apply({"params": unet_params}, ux, t, ctx, **added)
    steered = unet.apply({"params": unet_params}, ux, t, ctx, down_residuals=res.down, mid_residual=res.mid, **added)
    np.testing.assert_array_equal(plain, steered)


@needs_torch
def test_sum_residuals_adds_two_controlnets(rng):
    _, ours, params = _pair(controlnet_diffusers_config("tiny-sd21"))
    x, t, ctx, cond, _ = _inputs(ours.config, 1, 8, 8, rng)
    out = ours.apply({"params": params}, nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(cond))
    total = sum_residuals([out, out])
    np.testing.assert_allclose(total.down[3], 2 * out.down[3], rtol=1e-6)
    np.testing.assert_allclose(total.mid, 2 * out.mid, rtol=1e-6)


def test_wrong_condition_shape_is_named():
    cn = ControlNetModel(ControlNetConfig.from_dict(controlnet_diffusers_config("tiny-v1")))
    inputs = cn.dummy_inputs(size=8)
    params = cn.init_params(jax.random.key(0))
    inputs["controlnet_cond"] = jnp.ones((1, 64, 64, 9))
    want = r"controlnet_cond: expected \[B, 8, 8, 9\].*latent conditioning.*got \(1, 64, 64, 9\)"
    with pytest.raises(ValueError, match=want):
        cn.apply({"params": params}, **inputs)


def test_config_round_trips_and_refuses_unknown_fields():
    for variant in ("controlnet-sd21", "controlnet-sdxl", "tiny-v1"):
        d = controlnet_diffusers_config(variant)
        cfg = ControlNetConfig.from_dict(d)
        assert ControlNetConfig.from_dict(cfg.to_dict()) == cfg
    d = controlnet_diffusers_config("controlnet-sd21")
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNetConfig.from_dict({**d, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="conditioning_embedding_type='voxel'"):
        ControlNetConfig.from_dict({**d, "conditioning_embedding_type": "voxel"})
