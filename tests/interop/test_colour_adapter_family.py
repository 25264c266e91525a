"""The colour adapter as a registered family: a folder holds IP-Adapter's original layout, loads back bit-exact,
and converts generically."""

import jax
import numpy as np

import diffbody_jax
from diffbody_jax.cli.main import main
from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig, load_ip_adapter, original_state_dict
from diffbody_jax.interop.torch_files import read_state_dict
from diffbody_jax.models.unet import UNetConfig
from tests.torch_ref import resampler_config, unet_diffusers_config


def test_colour_adapter_folder_is_the_original_layout_and_round_trips(tmp_path, rng):
    unet_config = UNetConfig.from_dict(unet_diffusers_config("tiny-sdxl"))
    adapter_model = ColourAdapter(ColourAdapterConfig(unet_config, resampler_config(
        output_dims=unet_config.cross_attention_dim)))
    shapes = adapter_model.param_shapes()
    adapter = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    diffbody_jax.save_pretrained(tmp_path / "adapter", adapter_model, adapter)
    # the weights file is exactly what IP-Adapter's own exporter writes (fused to_kv, prefixed keys)
    written = read_state_dict(tmp_path / "adapter" / "ip_adapter.safetensors")
    want = original_state_dict(adapter, unet_config)
    assert set(written) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    # IP-Adapter's file loader reads it, and so does load_pretrained
    _, from_file = load_ip_adapter(tmp_path / "adapter" / "ip_adapter.safetensors", unet_config)
    jax.tree.map(np.testing.assert_array_equal, from_file, adapter)
    module, back = diffbody_jax.load_pretrained(tmp_path / "adapter", param_dtype=None)
    assert isinstance(module, ColourAdapter) and module.config == adapter_model.config
    jax.tree.map(np.testing.assert_array_equal, back, adapter)
    assert main(["convert", "to-flax", "--src", str(tmp_path / "adapter"), "--dst", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "again")]) == 0
    _, again = diffbody_jax.load_pretrained(tmp_path / "again", param_dtype=None)
    jax.tree.map(np.testing.assert_array_equal, again, adapter)
