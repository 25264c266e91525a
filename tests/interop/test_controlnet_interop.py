"""ControlNet weights between diffusers and us: round trips, folders diffusers loads, real-size coverage."""

import json

import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.interop.mapping import flatten_params, flax_to_torch, torch_to_flax
from diffbody_jax.interop.unet import controlnet_table
from diffbody_jax.models.controlnet import ControlNetConfig, ControlNetModel
from tests.torch_ref import REPO, assert_coverage, controlnet_diffusers_config, state_dict_numpy, torch_controlnet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("variant", ["tiny-sd21", "tiny-sdxl", "tiny-v1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(variant, dtype):
    config = controlnet_diffusers_config(variant)
    sd = state_dict_numpy(torch_controlnet(config).to(dtype))
    ours = ControlNetModel(ControlNetConfig.from_dict(config))
    table = controlnet_table(ours.config)
    back = flax_to_torch(torch_to_flax(sd, table, ours.param_shapes(), variant, dtype=None), table)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("variant", ["tiny-sd21", "tiny-sdxl"])
def test_saved_folder_loads_in_diffusers(tmp_path, variant):
    ref = torch_controlnet(controlnet_diffusers_config(variant), seed=2)
    ref.save_pretrained(tmp_path / "src")
    module, params = diffbody_jax.load_pretrained(tmp_path / "src")
    assert isinstance(module, ControlNetModel)
    diffbody_jax.save_pretrained(tmp_path / "ours", module, params)
    assert "conditioning_embedding_type" not in json.loads((tmp_path / "ours/config.json").read_text())
    loaded = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours")
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_latent_condition_folder_round_trips(tmp_path):
    """Ours only (diffusers has no latent-condition ControlNet): the config field and the conv_out key survive."""
    config = controlnet_diffusers_config("tiny-v1")
    ref = torch_controlnet(config, seed=3)
    module = ControlNetModel(ControlNetConfig.from_dict(config))
    params = torch_to_flax(state_dict_numpy(ref), controlnet_table(module.config), module.param_shapes(), "ref")
    diffbody_jax.save_pretrained(tmp_path, module, params)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["conditioning_embedding_type"] == "latent" and saved["conditioning_channels"] == 9
    again, params2 = diffbody_jax.load_pretrained(tmp_path)
    assert again.config == module.config
    for a, b in zip(flatten_params(params).values(), flatten_params(params2).values(), strict=True):
        np.testing.assert_array_equal(a, b)


# Measured on the meta device with diffusers 0.42.1 (see ../shared/reference/configs/README.md).
REAL = [("controlnet-sd21", 340, 364_228_240), ("controlnet-sdxl", 844, 1_251_014_160)]


@pytest.mark.parametrize("variant,n_keys,n_params", REAL)
def test_real_architecture_coverage(variant, n_keys, n_params):
    cfg = json.loads((REPO / f"configs/diffusers/{variant}/config.json").read_text())
    with torch.device("meta"):
        ref = diffusers.ControlNetModel.from_config(cfg)
    ours = ControlNetModel(ControlNetConfig.from_dict(cfg, variant))
    assert_coverage(ref, ours, controlnet_table(ours.config), n_keys, n_params, variant)
