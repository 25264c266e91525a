"""A phase's model as a group of modules, and `train.init_from` sources placed into it: a converted folder with
BatchNorm statistics, a ControlNet started from a UNet folder (`unet:`), and a missing path named."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.interop.pretrained import save_pretrained
from diffbody_jax.models.bodypart import BodyPartConfig, BodyPartNet
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.registry import build_model
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import param_partition_specs, tree_shardings
from diffbody_jax.training.engine import _init_sources, _load_into


@pytest.fixture(scope="module")
def group():
    return ModelGroup(unet=build_model(load_config("unet:variant=tiny-sd21").model),
                      controlnet=build_model(load_config("controlnet:variant=tiny-v1").model),
                      bodypart=BodyPartNet(config=BodyPartConfig.tiny()))


def _variables(group):
    boxed = group.abstract_variables()
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = tree_shardings(nn.unbox(boxed), param_partition_specs(boxed["params"], mesh), mesh)
    return nn.unbox(group.init(jax.random.key(0))), shardings


def test_group_variables_are_keyed_by_member_and_match_their_shapes(group):
    variables, _ = _variables(group)
    assert set(variables["params"]) == {"unet", "controlnet", "bodypart"}
    assert set(variables["batch_stats"]) == {"bodypart"}
    abstract = nn.unbox(group.abstract_variables())
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, variables)
    out = group.apply("unet", variables, **group.unet.dummy_inputs())
    assert out.shape == group.unet.dummy_inputs()["sample"].shape
    with pytest.raises(AttributeError, match="no member 'vae'"):
        _ = group.vae


def test_init_sources_fill_params_and_batch_stats(group, tmp_path, rng):
    variables, shardings = _variables(group)
    unet_params = group.unet.init_params(jax.random.key(7))
    save_pretrained(tmp_path / "unet", group.unet, unet_params)
    part = group.bodypart.init_variables(jax.random.key(8))
    part = jax.tree.map(lambda x: x + rng.uniform(0.1, 1.0, np.shape(x)).astype(np.float32), part)  # not the init
    save_pretrained(tmp_path / "bodypart", group.bodypart, part)

    sources = _init_sources(f"unet={tmp_path / 'unet'},controlnet=unet:{tmp_path / 'unet'},"
                            f"bodypart={tmp_path / 'bodypart'}")
    for index, (subtree, path) in enumerate(sources):
        variables = _load_into(variables, shardings, subtree, path, group, jax.random.PRNGKey(index))
    for a, b in zip(jax.tree.leaves(unet_params), jax.tree.leaves(variables["params"]["unet"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for collection in ("params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(part[collection]), jax.tree.leaves(variables[collection]["bodypart"]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    # the ControlNet's encoder is the UNet's (diffusers' from_unet): conv_in and the first down block
    cn = variables["params"]["controlnet"]
    np.testing.assert_array_equal(np.asarray(cn["conv_in"]["kernel"]), np.asarray(unet_params["conv_in"]["kernel"]))
    first = jax.tree.leaves(unet_params["down_blocks_0"])
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(first, jax.tree.leaves(cn["down_blocks_0"]), strict=True))

    with pytest.raises(FileNotFoundError, match=r"train.init_from: unet = .*nothere: no such file"):
        _load_into(variables, shardings, "unet", str(tmp_path / "nothere"), group, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="does not fit params 'controlnet'"):
        _load_into(variables, shardings, "controlnet", str(tmp_path / "unet"), group, jax.random.PRNGKey(0))


def test_the_swinir_phase_starts_from_an_original_kair_checkpoint(tmp_path):
    from diffbody_jax.interop.swinir import save_swinir
    from diffbody_jax.training.engine import init_state, setup

    config = load_config("swinir:variant=tiny-diffbir")
    module = build_model(config.model)
    params = module.init_params(jax.random.key(5))
    save_swinir(tmp_path / "swinir.pth", module.config, params)  # KAIR's layout: {"params": state dict}
    config = load_config("swinir:variant=tiny-diffbir", [f"train.init_from={tmp_path / 'swinir.pth'}"])
    state = init_state(setup(config), config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_group_section_builds_its_members_by_name():
    import ml_collections

    from diffbody_jax.config import model_section
    from diffbody_jax.models.clip import CLIPTextModel
    from diffbody_jax.models.swinir import SwinIR
    from diffbody_jax.models.vae import AutoencoderKL

    text = dict(vocab_size=1000, hidden_size=24, intermediate_size=48, projection_dim=24, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu")
    section = model_section(name="group", members=ml_collections.ConfigDict(dict(
        swinir=load_config("swinir:variant=tiny-diffbir").model,
        vae=load_config("vae:variant=tiny", ["model.dtype=bfloat16"]).model,
        text_encoder=model_section(name="clip_text", transformers=text))))
    group = build_model(section)
    assert isinstance(group.swinir, SwinIR) and isinstance(group.vae, AutoencoderKL)
    assert isinstance(group.text_encoder, CLIPTextModel) and group.text_encoder.config.hidden_size == 24
    assert group.vae.dtype == np.dtype("bfloat16")  # each member keeps its own run-time fields
    with pytest.raises(ValueError, match="model.name='nope'"):
        build_model(model_section(name="group", members={"x": model_section(name="nope")}))
