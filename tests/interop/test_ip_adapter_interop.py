"""IP-Adapter-Plus weights: both layouts round-trip, files load in diffusers, errors, real-size coverage."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.interop import ip_adapter as ipa
from diffbody_jax.interop.mapping import ConversionError, flatten_params
from diffbody_jax.models.ip_adapter import Resampler
from diffbody_jax.models.unet import UNet2DConditionModel
from tests.models.test_ip_adapter import XL_RESAMPLER, _sdxl, original_key_shapes, tiny  # noqa: F401
from tests.torch_ref import (
    needs_torch,
    optional,
    state_dict_numpy,
)

torch = optional("torch")
diffusers = optional("diffusers")


@needs_torch
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_round_trip_is_bit_exact(tiny, layout, tmp_path):
    unet, resampler = tiny["unet"], tiny["resampler"]
    if layout == "original":
        src = tiny["original"]
        back = ipa.original_state_dict(ipa.adapter_from_state_dict(src, unet, resampler, "src"), unet.config)
    else:
        src = {k: v for k, v in state_dict_numpy(tiny["ref"]).items() if "processor" in k or "encoder_hid" in k}
        back = ipa.diffusers_state_dict(ipa.adapter_from_state_dict(src, unet, resampler, "src"), unet.config)
    assert set(back) == set(src)
    for k, v in src.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


@needs_torch
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_files_round_trip_and_load_in_diffusers(tiny, suffix, tmp_path):
    """Our export is the original layout that diffusers' loader reads unchanged."""
    unet = tiny["unet"]
    path = ipa.write_ip_adapter(tmp_path / f"ip-adapter-plus{suffix}",
                                ipa.original_state_dict(tiny["adapter"], unet.config))
    flat = ipa.read_ip_adapter(path)
    assert set(flat) == set(tiny["original"])
    for k, v in tiny["original"].items():
        np.testing.assert_array_equal(flat[k], v)
    if suffix == ".bin":
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"image_proj", "ip_adapter"}
        fresh = diffusers.UNet2DConditionModel.from_config(tiny["ref"].config).eval()
        fresh._load_ip_adapter_weights(raw, low_cpu_mem_usage=False)
        for k, v in tiny["ref"].state_dict().items():
            if "processor" in k or "encoder_hid" in k:
                assert torch.equal(fresh.state_dict()[k], v), k


@needs_torch
def test_infer_resampler_config(tiny):
    assert ipa.infer_resampler_config(tiny["original"]) == tiny["rcfg"]
    diff = {k: v for k, v in state_dict_numpy(tiny["ref"]).items() if "encoder_hid" in k}
    assert ipa.infer_resampler_config(diff) == tiny["rcfg"]


@needs_torch
def test_bad_weights_name_the_key(tiny):
    bad = dict(tiny["original"])
    bad["ip_adapter.3.to_k_ip.weight"] = bad["ip_adapter.3.to_k_ip.weight"][:, :-1]
    del bad["image_proj.layers.1.1.3.weight"]
    with pytest.raises(ConversionError) as e:
        ipa.adapter_from_state_dict(bad, tiny["unet"], tiny["resampler"], "bad.bin")
    msg = str(e.value)
    assert "bad.bin" in msg and "ip_adapter.3.to_k_ip.weight" in msg and "layers_1/ff_1/net_2/kernel" in msg
    with pytest.raises(ValueError, match="not an IP-Adapter"):
        ipa.adapter_from_state_dict({"foo.weight": np.zeros(3)}, tiny["unet"], tiny["resampler"], "x.bin")
    with pytest.raises(ValueError, match="ip_adapter=True"):
        UNet2DConditionModel(tiny["unet"].config).apply(
            {"params": tiny["plain"]}, jnp.ones((1, 8, 8, 4)), 1, jnp.ones((1, 3, 32)), text_embeds=jnp.ones((1, 16)),
            time_ids=jnp.ones((1, 6)), image_tokens=jnp.ones((1, 4, 32)))


def test_real_original_layout_coverage():
    """Our adapter tree for SDXL + IP-Adapter-Plus-XL against the hand-written original key/shape table."""
    _, unet = _sdxl()
    shapes = original_key_shapes(unet.config, XL_RESAMPLER)
    assert len([k for k in shapes if k.startswith("ip_adapter.")]) == 140  # 70 cross-attentions in SDXL
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("ip_adapter.")) == 139
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    expected = ipa.adapter_shapes(unet, Resampler(XL_RESAMPLER))
    n_params = sum(int(np.prod(v.shape)) for v in flatten_params(expected).values())
    assert n_params == sum(int(np.prod(s)) for s in shapes.values())
    split = ipa.split_kv(fake, "table")
    from diffbody_jax.interop.mapping import plan_import

    plan = plan_import({k: v.shape for k, v in split.items()},
                       {k: tuple(v.shape) for k, v in flatten_params(expected).items()},
                       ipa.adapter_table(unet.config, "original"), "IP-Adapter-Plus-XL table")
    assert len(plan) == len(split)
    assert ipa.infer_resampler_config(fake) == XL_RESAMPLER


@needs_torch
def test_real_diffusers_layout_coverage():
    """diffusers' converted layout, built on the meta device, against eval_shape of ours."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from diffbody_jax.interop.mapping import plan_import

    cfg, unet = _sdxl()
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(cfg)
        proj = IPAdapterPlusImageProjection(embed_dims=1280, output_dims=2048, hidden_dims=1280, heads=20,
                                            num_queries=16)
        procs = {}
        for name, proc in ref.attn_processors.items():
            if name.endswith("attn2.processor"):
                attn = ref.get_submodule(name[: -len(".processor")])
                procs[name] = IPAdapterAttnProcessor2_0(attn.inner_dim, 2048, num_tokens=(16,))
            else:
                procs[name] = proc
        ref.set_attn_processor(procs)
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if "processor" in k}
    torch_shapes.update({f"{ipa.DIFFUSERS_PROJ}.{k}": tuple(v.shape) for k, v in proj.state_dict().items()})
    expected = {k: tuple(v.shape) for k, v in
                flatten_params(ipa.adapter_shapes(unet, Resampler(XL_RESAMPLER))).items()}
    plan = plan_import(torch_shapes, expected, ipa.adapter_table(unet.config, "diffusers"), "SDXL IP-Adapter")
    assert len(plan) == len(torch_shapes) == len(expected)
    n = sum(int(np.prod(s)) for s in torch_shapes.values())
    assert n == sum(int(np.prod(s)) for s in expected.values())
    table = ipa.adapter_table(unet.config, "diffusers")
    for path, shape in expected.items():
        key, transform = table.torch_key(path)
        assert torch_shapes[key] == transform.torch_shape(shape), path
