"""A phase's model as a group of modules, and `train.init_from` sources placed into it: a converted folder with
BatchNorm statistics, a ControlNet started from a UNet folder (`unet:`), and a missing path named."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.interop.pretrained import save_pretrained
from diffbody_jax.models.bodypart import BodyPartNet
from diffbody_jax.models.group import ModelGroup
from diffbody_jax.models.registry import build_model
from diffbody_jax.parallel.mesh import MeshConfig, make_mesh
from diffbody_jax.parallel.sharding import param_partition_specs, tree_shardings
from diffbody_jax.training.init_from import init_sources, load_into
from tests.torch_ref import bodypart_config


@pytest.fixture(scope="module")
def group():
    return ModelGroup(unet=build_model(load_config("unet:variant=tiny-sd21").model),
                      controlnet=build_model(load_config("controlnet:variant=tiny-v1").model),
                      bodypart=BodyPartNet(config=bodypart_config()))


def _variables(group):
    """Host-drawn stand-in variables of the group (nothing compiles) and their one-device shardings."""
    from diffbody_jax.models.variables import random_variables

    boxed = group.abstract_variables()
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = tree_shardings(nn.unbox(boxed), param_partition_specs(boxed["params"], mesh), mesh)
    return random_variables(group, 0), shardings


def test_group_variables_are_keyed_by_member_and_match_their_shapes(group):
    initialised = jax.eval_shape(lambda k: nn.unbox(group.init(k)), jax.random.key(0))  # the init's tree, traced
    assert set(initialised["params"]) == {"unet", "controlnet", "bodypart"}
    assert set(initialised["batch_stats"]) == {"bodypart"}
    abstract = nn.unbox(group.abstract_variables())
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, initialised)
    variables, _ = _variables(group)
    out = jax.jit(lambda v: group.apply("unet", v, **group.unet.dummy_inputs()))(variables)
    assert out.shape == group.unet.dummy_inputs()["sample"].shape
    with pytest.raises(AttributeError, match="no member 'vae'"):
        _ = group.vae


def test_init_sources_fill_params_and_batch_stats(group, tmp_path, rng):
    variables, shardings = _variables(group)
    from diffbody_jax.models.variables import random_variables

    unet_params = random_variables(group.unet, 7)["params"]
    save_pretrained(tmp_path / "unet", group.unet, unet_params)
    part = random_variables(group.bodypart, 8)
    part = jax.tree.map(lambda x: x + rng.uniform(0.1, 1.0, np.shape(x)).astype(np.float32), part)  # not the init
    save_pretrained(tmp_path / "bodypart", group.bodypart, part)

    sources = init_sources(f"unet={tmp_path / 'unet'},controlnet=unet:{tmp_path / 'unet'},"
                            f"bodypart={tmp_path / 'bodypart'}")
    for index, (subtree, path) in enumerate(sources):
        variables = load_into(variables, shardings, subtree, path, group, jax.random.PRNGKey(index))
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
        load_into(variables, shardings, "unet", str(tmp_path / "nothere"), group, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="does not fit params 'controlnet'"):
        load_into(variables, shardings, "controlnet", str(tmp_path / "unet"), group, jax.random.PRNGKey(0))


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


@pytest.mark.parametrize("scan_layers", [False, True])
def test_partial_sources_fill_their_paths_and_leave_the_rest(tmp_path, scan_layers):
    """A colour adapter file (IP-Adapter-Plus layout) fills a Stage2Model's Resampler and to_k_ip / to_v_ip only; a
    plain UNet file fills an adapter UNet but its to_k_ip / to_v_ip. Host-drawn weights: nothing compiles. With
    scan_layers the model holds its depth-2 stacks stacked, and the files (block by block) fill them alike."""
    from diffbody_jax.interop.ip_adapter import ColourAdapter, ColourAdapterConfig
    from diffbody_jax.models.ip_adapter import IP_KERNELS, without_ip_adapter
    from diffbody_jax.models.stage2 import adapter_params
    from diffbody_jax.models.variables import random_variables

    stage2 = build_model(load_config("stage2:variant=tiny", [f"model.scan_layers={scan_layers}"]).model)
    group = ModelGroup(stage2=stage2)
    assert ("transformer_blocks" in stage2.param_shapes()["unet"]["mid_block"]["attentions_0"]) == scan_layers
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    boxed = group.abstract_variables()
    shardings = tree_shardings(nn.unbox(boxed), param_partition_specs(boxed["params"], mesh), mesh)
    fresh = {"params": {"stage2": random_variables(stage2, 1)["params"]}}
    other = random_variables(stage2, 2)["params"]  # what the files hold
    adapter = ColourAdapter(ColourAdapterConfig(stage2.unet.config, stage2.image_proj.config))
    save_pretrained(tmp_path / "adapter", adapter, adapter_params(other))
    save_pretrained(tmp_path / "unet", stage2.unet.clone(ip_adapter=False), without_ip_adapter(other["unet"]))

    def flat(tree):
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def is_adapter(path):
        return path.startswith("['image_proj']") or any(f"['{k}']" in path for k in IP_KERNELS)

    placed = flat(load_into(fresh, shardings, "stage2", str(tmp_path / "adapter"), group,
                            jax.random.key(0))["params"]["stage2"])
    want_file, want_fresh = flat(other), flat(fresh["params"]["stage2"])
    assert sum(map(is_adapter, placed)) > 0
    for path, value in placed.items():
        np.testing.assert_array_equal(value, (want_file if is_adapter(path) else want_fresh)[path], err_msg=path)

    placed = flat(load_into(fresh, shardings, "stage2/unet", str(tmp_path / "unet"), group,
                            jax.random.key(0))["params"]["stage2"])
    for path, value in placed.items():
        from_file = path.startswith("['unet']") and not is_adapter(path)
        np.testing.assert_array_equal(value, (want_file if from_file else want_fresh)[path], err_msg=path)


def test_members_filled_whole_skip_their_init_and_change_nothing(tmp_path):
    """init_variables_from: a member a source fills whole starts as zeros instead of a compiled init; the result is
    the full init with the file placed, leaf for leaf."""
    from diffbody_jax.models.variables import random_variables
    from diffbody_jax.training.init_from import init_variables_from

    group = ModelGroup(swinir=build_model(load_config("swinir:variant=tiny-diffbir").model),
                       bodypart=BodyPartNet(config=bodypart_config()))
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    boxed = group.abstract_variables()
    shardings = tree_shardings(nn.unbox(boxed), param_partition_specs(boxed["params"], mesh), mesh)
    part = random_variables(group.bodypart, 3)
    save_pretrained(tmp_path / "bodypart", group.bodypart, part)
    key = jax.random.PRNGKey(5)

    got = init_variables_from(group, shardings, key, [("bodypart", str(tmp_path / "bodypart"))])
    full = jax.jit(group.init_variables)(key)
    want = load_into(full, shardings, "bodypart", str(tmp_path / "bodypart"), group, jax.random.fold_in(key, 0))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    zeros = jax.jit(lambda k: group.init_variables(k, placeholders={"bodypart"}))(key)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(zeros["params"]["bodypart"]))
