"""CLIP weights between transformers and us: round trips, both key layouts, folders, real-size coverage."""

import json

import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.interop.clip import clip_text_table, clip_vision_table
from diffbody_jax.interop.mapping import flatten_params, flax_to_torch, plan_import, torch_to_flax
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from tests.torch_ref import REPO, randomize_, state_dict_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
            max_position_embeddings=16, projection_dim=24, bos_token_id=118, eos_token_id=119)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=28,
              patch_size=7, projection_dim=24)


def _ref(arch):
    cfg = (transformers.CLIPVisionConfig(**VISION) if "Vision" in arch else transformers.CLIPTextConfig(**TEXT))
    ref = getattr(transformers, arch)(cfg).eval()
    randomize_(ref, seed=3)
    return ref


@pytest.mark.parametrize("arch", ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"])
def test_folder_round_trip_through_transformers(arch, tmp_path):
    ref = _ref(arch)
    ref.save_pretrained(tmp_path / "src")
    module, params = diffbody_jax.load_pretrained(tmp_path / "src", param_dtype=None)
    diffbody_jax.save_pretrained(tmp_path / "ours", module, params)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [arch]
    loaded = getattr(transformers, arch).from_pretrained(tmp_path / "ours")
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_bit_exact_in_hub_layout(dtype):
    ref = _ref("CLIPTextModelWithProjection").to(dtype)
    sd = state_dict_numpy(ref)  # "text_model."-prefixed keys, as on the hub
    assert all(k.startswith(("text_model.", "text_projection")) for k in sd)
    cfg = CLIPTextConfig.from_dict({**ref.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    ours = CLIPTextModel(cfg)
    table = clip_text_table(cfg)
    back = flax_to_torch(torch_to_flax(sd, table, ours.param_shapes(), "te", dtype=None), table)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].tobytes() == value.tobytes(), key


def test_unprefixed_transformers5_keys_import_as_well():
    ref = _ref("CLIPTextModel")  # transformers 5 keys its bare CLIPTextModel without "text_model."
    sd = state_dict_numpy(ref)
    cfg = CLIPTextConfig.from_dict(ref.config.to_dict())
    params = torch_to_flax(sd, clip_text_table(cfg), CLIPTextModel(cfg).param_shapes(), "te")
    back = flax_to_torch(params, clip_text_table(cfg))
    for key, value in sd.items():
        np.testing.assert_array_equal(back["text_model." + key.removeprefix("text_model.")], value)


# Measured on the meta device (../shared/reference/configs/README.md).
REAL = [
    ("sd21-base/text_encoder", "CLIPTextModel", 372, 340_387_840),
    ("sdxl-base/text_encoder", "CLIPTextModel", 196, 123_060_480),
    ("sdxl-base/text_encoder_2", "CLIPTextModelWithProjection", 517, 694_659_840),
    ("ip-adapter-image-encoder", "CLIPVisionModelWithProjection", 520, 632_076_800),
]


@pytest.mark.parametrize("folder,arch,n_keys,n_params", REAL)
def test_real_architecture_coverage(folder, arch, n_keys, n_params):
    cfg_dict = json.loads((REPO / f"configs/diffusers/{folder}/config.json").read_text())
    assert cfg_dict["architectures"] == [arch]
    vision = "Vision" in arch
    tcfg = (transformers.CLIPVisionConfig if vision else transformers.CLIPTextConfig)(**cfg_dict)
    with torch.device("meta"):
        ref = getattr(transformers, arch)(tcfg)
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(torch_shapes) == n_keys
    cfg = (CLIPVisionConfig if vision else CLIPTextConfig).from_dict(cfg_dict, folder)
    ours = (CLIPVisionModel if vision else CLIPTextModel)(cfg)
    flax_shapes = {k: tuple(v.shape) for k, v in flatten_params(ours.param_shapes()).items()}
    assert sum(int(np.prod(s)) for s in flax_shapes.values()) == n_params
    table = (clip_vision_table if vision else clip_text_table)(cfg)
    assert len(plan_import(torch_shapes, flax_shapes, table, folder)) == n_keys
    for path, shape in flax_shapes.items():  # export writes the hub's prefixed layout
        key, transform = table.torch_key(path)
        local = key if key in torch_shapes else key.split(".", 1)[1]
        assert torch_shapes[local] == transform.torch_shape(shape), path
