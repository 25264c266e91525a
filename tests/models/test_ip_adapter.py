"""The colour adapter (IP-Adapter-Plus) against diffusers' IP-Adapter path, and its weight layouts.

The reference is diffusers' own loader: a tiny SDXL-like UNet is given an IP-Adapter state dict in the
original file layout through `UNet2DConditionModel._load_ip_adapter_weights`, which builds
`IPAdapterPlusImageProjection` and `IPAdapterAttnProcessor2_0`; we import the same dict with our table.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop import ip_adapter as ipa
from diffbody_jax.interop.mapping import torch_to_flax
from diffbody_jax.interop.unet import unet_table
from diffbody_jax.models.ip_adapter import Resampler, ResamplerConfig, with_ip_adapter
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import (
    REPO,
    nchw_to_nhwc,
    needs_torch,
    nhwc_to_nchw,
    optional,
    randomize_,
    resampler_config,
    state_dict_numpy,
    unet_diffusers_config,
)

torch = optional("torch")
diffusers = optional("diffusers")

TOL = 1e-4


def original_key_shapes(unet: UNetConfig, r: ResamplerConfig) -> dict[str, tuple[int, ...]]:
    """The original IP-Adapter-Plus layout, written by hand from diffusers' converter and IP-Adapter's Resampler:
    image_proj (latents, proj_in, proj_out, norm_out; per layer a PerceiverAttention at .0 and a feed-forward at
    .1.{0,1,3}) and ip_adapter (to_k_ip / to_v_ip per cross-attention, numbered 1, 3, 5, ... over all processors)."""
    inner, ff = r.heads * r.dim_head, r.hidden_dims * r.ffn_ratio
    out = {
        "image_proj.latents": (1, r.num_queries, r.hidden_dims),
        "image_proj.proj_in.weight": (r.hidden_dims, r.embed_dims), "image_proj.proj_in.bias": (r.hidden_dims,),
        "image_proj.proj_out.weight": (r.output_dims, r.hidden_dims), "image_proj.proj_out.bias": (r.output_dims,),
        "image_proj.norm_out.weight": (r.output_dims,), "image_proj.norm_out.bias": (r.output_dims,),
    }
    for i in range(r.depth):
        p = f"image_proj.layers.{i}"
        for n in ("0.norm1", "0.norm2", "1.0"):
            out[f"{p}.{n}.weight"] = out[f"{p}.{n}.bias"] = (r.hidden_dims,)
        out[f"{p}.0.to_q.weight"] = (inner, r.hidden_dims)
        out[f"{p}.0.to_kv.weight"] = (2 * inner, r.hidden_dims)
        out[f"{p}.0.to_out.weight"] = (r.hidden_dims, inner)
        out[f"{p}.1.1.weight"] = (ff, r.hidden_dims)
        out[f"{p}.1.3.weight"] = (r.hidden_dims, ff)
    # every transformer block's attn2, in the order of diffusers' attn_processors: down, up, mid
    widths = []
    for i, kind in enumerate(unet.down_block_types):
        if kind.startswith("CrossAttn"):
            widths += [unet.block_out_channels[i]] * (unet.layers[i] * unet.transformer_depths[i])
    for i, kind in enumerate(unet.up_block_types):
        if kind.startswith("CrossAttn"):
            c = unet.block_out_channels[::-1][i]
            widths += [c] * ((unet.layers[::-1][i] + 1) * unet.up_transformer_depths[i])
    widths += [unet.block_out_channels[-1]] * unet.transformer_depths[-1]
    for n, c in enumerate(widths):
        for name in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * n + 1}.{name}.weight"] = (c, unet.cross_attention_dim)
    return out


def random_original(unet: UNetConfig, r: ResamplerConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in original_key_shapes(unet, r).items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) >= 2:
            out[key] = noise / np.sqrt(shape[-1])
        else:
            out[key] = (1 + 0.1 * noise) if key.endswith("weight") else 0.1 * noise
    return out


def nested(flat):
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        part, _, rest = k.partition(".")
        out[part][rest] = torch.from_numpy(np.ascontiguousarray(v))
    return out


@pytest.fixture(scope="module")
def tiny():
    cfg = unet_diffusers_config("tiny-sdxl")
    ref = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    randomize_(ref, seed=0)
    plain_sd = state_dict_numpy(ref)
    ucfg = UNetConfig.from_dict(cfg)
    rcfg = resampler_config(output_dims=ucfg.cross_attention_dim)
    original = random_original(ucfg, rcfg, seed=1)
    ref._load_ip_adapter_weights(nested(original), low_cpu_mem_usage=False)
    unet = UNet2DConditionModel(ucfg, ip_adapter=True)
    resampler = Resampler(rcfg)
    plain = torch_to_flax(plain_sd, unet_table(ucfg), UNet2DConditionModel(ucfg).param_shapes(), "tiny-sdxl")
    adapter = ipa.adapter_from_state_dict(original, unet, resampler, "random original")
    return dict(ref=ref, unet=unet, resampler=resampler, plain=plain, adapter=adapter, original=original, rcfg=rcfg)


def _inputs(seed, ucfg, batch=2, size=16, tokens=7, clip_width=24):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(
        sample=f(batch, size, size, 4), t=rng.integers(0, 1000, batch), ctx=f(batch, 5, ucfg.cross_attention_dim),
        text_embeds=f(batch, ucfg.text_embeds_dim), time_ids=rng.uniform(0, 1024, (batch, 6)).astype(np.float32),
        clip=f(batch, tokens, clip_width),
    )


def _set_scale(ref, scale):
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]


@needs_torch
@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 0.6)])
def test_unet_with_adapter_matches_diffusers(tiny, seed, scale):
    ref, unet, resampler = tiny["ref"], tiny["unet"], tiny["resampler"]
    x = _inputs(seed, unet.config)
    _set_scale(ref, scale)
    with torch.no_grad():
        want = ref(
            torch.from_numpy(nhwc_to_nchw(x["sample"])), torch.from_numpy(x["t"]), torch.from_numpy(x["ctx"]),
            added_cond_kwargs={"text_embeds": torch.from_numpy(x["text_embeds"]),
                               "time_ids": torch.from_numpy(x["time_ids"]),
                               "image_embeds": [torch.from_numpy(x["clip"][:, None])]},
        ).sample.numpy()
        want_tokens = ref.encoder_hid_proj.image_projection_layers[0](torch.from_numpy(x["clip"])).numpy()
    tokens = resampler.apply({"params": tiny["adapter"]["image_proj"]}, x["clip"])
    np.testing.assert_allclose(tokens, want_tokens, atol=TOL, rtol=0)
    params = with_ip_adapter(tiny["plain"], tiny["adapter"])
    got = unet.apply({"params": params}, x["sample"], x["t"], x["ctx"], text_embeds=x["text_embeds"],
                     time_ids=x["time_ids"], image_tokens=tokens, ip_scale=scale)
    err = np.abs(np.asarray(got) - nchw_to_nhwc(want)).max()
    assert err <= TOL, err
    # the adapter is doing something at this scale: without it the output moves well beyond the tolerance
    plain = UNet2DConditionModel(unet.config).apply({"params": tiny["plain"]}, x["sample"], x["t"], x["ctx"],
                                                    text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 100 * TOL


@needs_torch
def test_scale_zero_is_the_plain_unet_exactly(tiny):
    unet = tiny["unet"]
    x = _inputs(5, unet.config)
    params = with_ip_adapter(tiny["plain"], tiny["adapter"])
    tokens = Resampler(tiny["rcfg"]).apply({"params": tiny["adapter"]["image_proj"]}, x["clip"])
    kw = dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    plain = jax.jit(lambda p: UNet2DConditionModel(unet.config).apply({"params": p}, x["sample"], x["t"], x["ctx"],
                                                                      **kw))(tiny["plain"])
    traced = jax.jit(lambda p, s: unet.apply({"params": p}, x["sample"], x["t"], x["ctx"], image_tokens=tokens,
                                             ip_scale=s, **kw))(params, jnp.float32(0.0))
    static = unet.apply({"params": params}, x["sample"], x["t"], x["ctx"], image_tokens=tokens, ip_scale=0.0, **kw)
    no_tokens = unet.apply({"params": params}, x["sample"], x["t"], x["ctx"], **kw)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(static), np.asarray(no_tokens))
    # per-example scales: example 0 off, example 1 on
    per = unet.apply({"params": params}, x["sample"], x["t"], x["ctx"], image_tokens=tokens,
                     ip_scale=jnp.array([0.0, 1.0]), **kw)
    on = unet.apply({"params": params}, x["sample"], x["t"], x["ctx"], image_tokens=tokens, ip_scale=1.0, **kw)
    np.testing.assert_allclose(per[0], no_tokens[0], atol=1e-6)
    np.testing.assert_allclose(per[1], on[1], atol=1e-6)


@needs_torch
def test_attention_numbering_is_diffusers_processor_order(tiny):
    cross = [name[: -len(".processor")] for name in tiny["ref"].attn_processors if name.endswith("attn2.processor")]
    ours = [p.replace("/", ".").replace("_", ".").replace("down.blocks", "down_blocks").replace(
        "up.blocks", "up_blocks").replace("mid.block", "mid_block").replace("transformer.blocks", "transformer_blocks")
        for p in ipa.ip_attention_paths(tiny["unet"].config)]
    assert ours == cross
    names = list(tiny["ref"].attn_processors)
    assert all(names[2 * n + 1].endswith("attn2.processor") for n in range(len(cross)))


# ------------------------------------------------------------------------------ real-size coverage
XL_RESAMPLER = ResamplerConfig()  # IP-Adapter-Plus-XL: 16 queries, width 1280, 4 layers, 20 heads of 64


def _sdxl():
    cfg = json.loads((REPO / "configs/diffusers/sdxl-base/unet/config.json").read_text())
    return cfg, UNet2DConditionModel(UNetConfig.from_dict(cfg, "sdxl-base"), ip_adapter=True)


