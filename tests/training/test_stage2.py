"""Stage 2's forward pass, its two losses (Eqs. 3-4) and their trainable subsets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.diffusion.schedule import NoiseSchedule
from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet
from diffbody_jax.models.ip_adapter import Resampler, ResamplerConfig, ip_adapter_of
from diffbody_jax.models.stage2 import Stage2Model, stage2_params
from diffbody_jax.models.unet import SDXLText, UNet2DConditionModel, UNetConfig
from diffbody_jax.models.variables import random_variables
from diffbody_jax.training.losses import stage2_loss
from diffbody_jax.training.phases import STAGE2_SUBSETS
from diffbody_jax.training.trainable import merge, partition
from tests.torch_ref import REPO, controlnet_diffusers_config, resampler_config, unet_diffusers_config

PRIORS = ("ir", "pose", "depth", "normal")


@pytest.fixture(scope="module")
def stage2():
    ucfg = UNetConfig.from_dict(unet_diffusers_config("tiny-sdxl"))
    ccfg = ControlNetConfig.from_dict(controlnet_diffusers_config("tiny-v2-stage2"))
    model = Stage2Model(UNet2DConditionModel(ucfg, ip_adapter=True), ControlNetModel(ccfg),
                        Resampler(resampler_config()))
    # host-drawn (compiling the init costs minutes here); every weight matrix non-zero, zero convs included
    return model, random_variables(model, seed=0)["params"]


def _batch(seed, b=2, size=8):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return dict(latents=f(b, size, size, 4), prompt_embeds=f(b, 5, 32), text_embeds=f(b, 16),
                time_ids=jnp.asarray(rng.uniform(0, 1024, (b, 6)), jnp.float32),
                priors={n: f(b, 8 * size, 8 * size, 3) for n in PRIORS}, image_features=f(b, 7, 24))


def _text(batch):
    return SDXLText(batch["prompt_embeds"], batch["text_embeds"], batch["time_ids"])


def test_forward_composes_controlnet_adapter_and_unet(stage2):
    model, params = stage2
    b = _batch(0)
    t = jnp.array([10, 900])
    eps = model.apply({"params": params}, b["latents"], t, _text(b), b["priors"], b["image_features"])
    assert eps.shape == b["latents"].shape
    # the same by hand
    res = model.controlnet.apply({"params": params["controlnet"]}, b["latents"], t, b["prompt_embeds"], b["priors"],
                                 text_embeds=b["text_embeds"], time_ids=b["time_ids"])
    tokens = model.image_proj.apply({"params": params["image_proj"]}, b["image_features"])
    want = model.unet.apply({"params": params["unet"]}, b["latents"], t, b["prompt_embeds"],
                            text_embeds=b["text_embeds"], time_ids=b["time_ids"], down_residuals=res.down,
                            mid_residual=res.mid, image_tokens=tokens)
    np.testing.assert_array_equal(np.asarray(eps), np.asarray(want))
    # ControlNet and adapter off: the plain UNet
    off = model.apply({"params": params}, b["latents"], t, _text(b), b["priors"], None, conditioning_scale=0.0)
    plain = UNet2DConditionModel(model.unet.config).apply(
        {"params": params["unet"]}, b["latents"], t, b["prompt_embeds"], text_embeds=b["text_embeds"],
        time_ids=b["time_ids"])
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


@pytest.mark.parametrize("phase", ["controlnet", "colour_adapter"])
def test_loss_trains_exactly_its_subset(stage2, phase):
    """Eq. 3 through the whole prior-fusion ControlNet and the UNet, Eq. 4 through the adapter (batch 1: the
    gradient paths, not the batch, are what is tested; kept small to stay in the default suite)."""
    model, params = stage2
    batch = _batch(1, b=1)
    sdxl = json.loads((REPO / "configs/diffusers/sdxl-base/scheduler/scheduler_config.json").read_text())
    acp = NoiseSchedule.from_dict(sdxl).arrays()["alphas_cumprod"]
    subset = STAGE2_SUBSETS[phase]
    trainable, frozen = partition(params, subset)

    def loss(tr):
        return stage2_loss(model, merge(tr, frozen), batch, jax.random.key(3), acp, phase)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert np.isfinite(value)
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert flat and all(np.all(np.isfinite(g)) for g in flat.values())
    roots = {k.split("'")[1] for k in flat}
    if phase == "controlnet":
        assert roots == {"controlnet"}
        alpha = grads["controlnet"]["controlnet_cond_embedding"]["alpha_logits"]
        assert np.all(np.abs(np.asarray(alpha)) > 0)
    else:
        assert roots == {"unet", "image_proj"}
        assert all(k.split("'")[-4] in ("to_k_ip", "to_v_ip") for k in flat if k.startswith("['unet']"))
        nonzero = sum(float(jnp.abs(g).sum()) > 0 for g in flat.values())
        assert nonzero == len(flat)
    # the frozen side really is everything else
    n_tr, n_all = subset.count(params)
    assert 0 < n_tr < n_all


def test_controlnet_phase_ignores_the_adapter(stage2):
    """Eq. 3 trains before the adapter exists: its loss does not depend on adapter params at all."""
    model, params = stage2
    batch = _batch(2)
    acp = jnp.linspace(0.999, 0.01, 1000)
    moved = dict(params, image_proj=jax.tree.map(lambda x: x + 1.0, params["image_proj"]))
    a = stage2_loss(model, params, batch, jax.random.key(0), acp, "controlnet")[0]
    b = stage2_loss(model, moved, batch, jax.random.key(0), acp, "controlnet")[0]
    c = stage2_loss(model, moved, batch, jax.random.key(0), acp, "colour_adapter")[0]
    assert float(a) == float(b) and float(b) != float(c)
    with pytest.raises(ValueError, match="image_features"):
        stage2_loss(model, params, {**batch, "image_features": None}, jax.random.key(0), acp, "colour_adapter")


def test_stage2_params_from_parts(stage2):
    model, params = stage2
    unet_plain = random_variables(UNet2DConditionModel(model.unet.config), seed=5)["params"]
    cn, _ = controlnet_from_unet(unet_plain, model.controlnet, jax.random.key(6))
    adapter = {"image_proj": params["image_proj"], "ip_adapter": ip_adapter_of(params["unet"])}
    full = stage2_params(unet_plain, cn, adapter)
    shapes = jax.tree.map(lambda x: x.shape, model.param_shapes())
    assert jax.tree.map(lambda x: x.shape, full) == shapes


def test_real_size_subsets():
    """SDXL + the stage-2 ControlNet + IP-Adapter-Plus-XL, eval_shape only: what each phase trains."""
    cfg = json.loads((REPO / "configs/diffusers/sdxl-base/unet/config.json").read_text())
    from diffbody_jax.config import load_config

    cn = load_config(f"{REPO}/configs/controlnet.py:variant=diffbody-v2-stage2").model.diffusers.to_dict()
    model = Stage2Model(UNet2DConditionModel(UNetConfig.from_dict(cfg), ip_adapter=True),
                        ControlNetModel(ControlNetConfig.from_dict(cn)), Resampler(ResamplerConfig()))
    shapes = model.param_shapes()
    n_cn, total = STAGE2_SUBSETS["controlnet"].count(shapes)
    n_ad, _ = STAGE2_SUBSETS["colour_adapter"].count(shapes)
    # diffusers' SDXL ControlNet (1,251,014,160) with its conditioning embedding (3x3 convs 3->16, 16->16->32,
    # 32->32->96, 96->96->256, 256->320: 1,086,480 params) replaced by four copies, plus four alpha logits
    assert n_cn == 1_251_014_160 + 3 * 1_086_480 + 4
    # the Resampler: latents 16 x 1280, proj_in 1280^2 + 1280, proj_out 1280 x 2048 + 2048, norm_out 2 x 2048, and
    # 4 layers of (3 LayerNorms 3 x 2 x 1280, q/k/v/out 4 x 1280^2, feed-forward 2 x 1280 x 5120) = 82,961,664;
    # to_k_ip/to_v_ip (2 x C x 2048) of 70 cross-attentions: 10 at C = 640 and 60 at C = 1280 = 340,787,200
    assert n_ad == 82_961_664 + 340_787_200
    assert total == 2_567_463_684 + n_cn + n_ad


@pytest.mark.parametrize("variant", ["tiny", "sdxl"])
def test_config_builds_the_model(variant):
    from diffbody_jax.config import load_config
    from diffbody_jax.models.stage2 import build_stage2

    config = load_config(f"{REPO}/configs/stage2.py:variant={variant}")
    model = build_stage2(config.model)
    assert model.image_proj.config.output_dims == model.unet.config.cross_attention_dim
    if variant == "tiny":
        shapes = model.param_shapes()
        assert set(shapes) == {"unet", "controlnet", "image_proj"}
    else:
        assert model.image_proj.config == ResamplerConfig()
