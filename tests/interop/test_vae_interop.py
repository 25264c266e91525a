"""VAE weights between diffusers and us: round trips, legacy names, folders, real-size coverage."""

import json

import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.interop.mapping import flatten_params, flax_to_torch, plan_import, torch_to_flax
from diffbody_jax.interop.vae import vae_table
from diffbody_jax.models.vae import AutoencoderKL, VAEConfig
from tests.torch_ref import REPO, needs_torch, optional, randomize_, state_dict_numpy, vae_diffusers_config

torch = optional("torch")
diffusers = optional("diffusers")

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_vae(variant, seed=0):
    ref = diffusers.AutoencoderKL(**vae_diffusers_config(variant)).eval()
    randomize_(ref, seed)
    return ref


@needs_torch
@pytest.mark.parametrize("variant", ["tiny", "tiny3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(variant, dtype):
    ref = _torch_vae(variant).to(getattr(torch, dtype))
    sd = state_dict_numpy(ref)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    table = vae_table(ours.config)
    back = flax_to_torch(torch_to_flax(sd, table, ours.param_shapes(), variant, dtype=None), table)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key


@needs_torch
def test_legacy_attention_names_import_and_export_as_current(tmp_path):
    """diffusers < 0.14 wrote the VAE attention as query/key/value/proj_attn; SD2.1's files still do."""
    from diffbody_jax.interop.torch_files import write_safetensors

    ref = _torch_vae("tiny", seed=1)
    sd = state_dict_numpy(ref)
    legacy = {}
    for key, value in sd.items():
        for new, old in LEGACY.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    write_safetensors(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **dict(ref.config)}))
    module, params = diffbody_jax.load_pretrained(tmp_path)
    back = flax_to_torch(params, vae_table(module.config))
    assert set(back) == set(sd)  # current names on export
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value)


@needs_torch
def test_saved_folder_loads_in_diffusers(tmp_path):
    ref = _torch_vae("tiny3", seed=2)
    ref.save_pretrained(tmp_path / "src")
    module, params = diffbody_jax.load_pretrained(tmp_path / "src")
    assert module.config.shift_factor == pytest.approx(0.1159)
    diffbody_jax.save_pretrained(tmp_path / "ours", module, params)
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.config.scaling_factor == ref.config.scaling_factor


@needs_torch
@pytest.mark.parametrize("variant", ["sd21-base", "sdxl-base", "sdxl-vae-fp16-fix"])
def test_real_architecture_coverage(variant):
    cfg = json.loads((REPO / f"configs/diffusers/{variant}/vae/config.json").read_text())
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(cfg)
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(torch_shapes) == 248
    ours = AutoencoderKL(VAEConfig.from_dict(cfg, variant))
    flax_shapes = {k: tuple(v.shape) for k, v in flatten_params(ours.param_shapes()).items()}
    assert sum(int(np.prod(s)) for s in flax_shapes.values()) == 83_653_863
    table = vae_table(ours.config)
    assert len(plan_import(torch_shapes, flax_shapes, table, variant)) == 248
    for path, shape in flax_shapes.items():
        key, transform = table.torch_key(path)
        assert torch_shapes[key] == transform.torch_shape(shape), path


def test_unsupported_vae_fields_are_named():
    cfg = {**vae_diffusers_config("tiny"), "latents_mean": [0.1] * 4}
    with pytest.raises(ValueError, match=r"vae/config.json: VAE config fields not supported: latents_mean="):
        VAEConfig.from_dict(cfg, "vae/config.json")
