"""UNet weights between diffusers and us: round trips, folders diffusers loads, real-size coverage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.interop.mapping import ConversionError, flax_to_torch, torch_to_flax
from diffbody_jax.interop.unet import unet_table
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import (
    REPO,
    assert_coverage,
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


def _torch_unet(variant, seed=0, dtype="float32"):
    ref = diffusers.UNet2DConditionModel(**unet_diffusers_config(variant)).eval()
    randomize_(ref, seed)
    return ref.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


@needs_torch
@pytest.mark.parametrize("variant", ["tiny-sd21", "tiny-sdxl", "tiny-cond"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(variant, dtype):
    ref = _torch_unet(variant, dtype=dtype)
    sd = state_dict_numpy(ref)
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    table = unet_table(ours.config)
    params = torch_to_flax(sd, table, ours.param_shapes(), variant, dtype=None)
    back = flax_to_torch(params, table)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


@needs_torch
def test_saved_folder_loads_in_diffusers_and_matches(tmp_path, rng):
    ref = _torch_unet("tiny-sdxl", seed=3)
    ref.save_pretrained(tmp_path / "src")  # diffusers' own layout: config.json + safetensors
    module, params = diffbody_jax.load_pretrained(tmp_path / "src")
    diffbody_jax.save_pretrained(tmp_path / "ours", module, params)

    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    got, want = tiny_sdxl_outputs(loaded, module, params, rng)
    assert np.abs(got - want).max() <= 1e-4


def tiny_sdxl_outputs(ref, module, params, rng) -> tuple[np.ndarray, np.ndarray]:
    """(ours, diffusers') NCHW noise predictions of a tiny-sdxl UNet on one fresh random input (text_time
    conditioning included)."""
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 32)).astype(np.float32)
    text = rng.standard_normal((1, 16)).astype(np.float32)
    ids = rng.integers(0, 1024, (1, 6)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), 321, torch.from_numpy(ctx), added_cond_kwargs={
            "text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}).sample.numpy()
    got = module.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), 321, ctx, text_embeds=text, time_ids=ids)
    return nhwc_to_nchw(np.asarray(got)), want


@needs_torch
@pytest.mark.parametrize("fmt", ["bin", "sharded-safetensors", "sharded-bin"])
def test_load_pretrained_reads_bin_and_sharded_folders(tmp_path, fmt):
    ref = _torch_unet("tiny-sd21", seed=4)
    ref.save_pretrained(tmp_path, safe_serialization=fmt.endswith("safetensors"),
                        max_shard_size="200KB" if fmt.startswith("sharded") else "10GB")
    names = sorted(p.name for p in tmp_path.iterdir())
    if fmt.startswith("sharded"):
        assert any(n.endswith(".index.json") for n in names), names
    module, params = diffbody_jax.load_pretrained(tmp_path, param_dtype=None)
    back = flax_to_torch(params, unet_table(module.config))
    for key, value in state_dict_numpy(ref).items():
        np.testing.assert_array_equal(back[key], value)


@needs_torch
def test_bad_checkpoint_lists_every_problem_with_the_file(tmp_path):
    from diffbody_jax.interop.torch_files import write_safetensors

    ref = _torch_unet("tiny-sd21")
    sd = state_dict_numpy(ref)
    del sd["conv_out.bias"]
    sd["mid_block.attentions.0.proj_in.weight"] = sd["mid_block.attentions.0.proj_in.weight"][:, :-1]
    sd["controlnet_cond_embedding.conv_in.weight"] = np.zeros((1,), np.float32)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **dict(ref.config)}))
    write_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError) as info:
        diffbody_jax.load_pretrained(tmp_path)
    msg = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "conv_out/bias" in msg
    assert "controlnet_cond_embedding.conv_in.weight" in msg
    assert "mid_block.attentions.0.proj_in.weight (64, 63) -> mid_block/attentions_0/proj_in/kernel (64, 64)" in msg


def test_unsupported_config_names_the_file(tmp_path):
    cfg = {"_class_name": "UNet2DConditionModel", **unet_diffusers_config("tiny-sd21")}
    cfg["class_embed_type"] = "projection"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: UNet config fields not supported: class_embed_type"):
        diffbody_jax.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ValueError, match="model class 'UNet3DConditionModel' is not supported"):
        diffbody_jax.load_pretrained(tmp_path)


# Measured on the meta device with diffusers 0.42.1 (see ../shared/reference/configs/README.md).
REAL = [("sd21-base", 686, 865_910_724), ("sd21-768v", 686, 865_910_724), ("sdxl-base", 1680, 2_567_463_684)]


@needs_torch
@pytest.mark.parametrize("variant,n_keys,n_params", REAL)
def test_real_architecture_coverage(variant, n_keys, n_params):
    """Every key of the real UNet maps both ways with equal shapes; no weights, no memory."""
    cfg = json.loads((REPO / f"configs/diffusers/{variant}/unet/config.json").read_text())
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(cfg)
    ours = UNet2DConditionModel(UNetConfig.from_dict(cfg, variant))
    assert_coverage(ref, ours, unet_table(ours.config), n_keys, n_params, variant)


def test_param_tree_is_plain_and_jittable():
    ours = UNet2DConditionModel(UNetConfig.from_dict(unet_diffusers_config("tiny-sd21")))
    params = ours.init_params(jax.random.key(0))
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(params))
    assert "down_blocks_0" in params and "resnets_0" in params["down_blocks_0"]
