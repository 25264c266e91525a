"""Scanned transformer stacks (`scan_layers`): the same function as the unrolled blocks, diffusers' files unchanged,
and the two param layouts converted exactly (models/stacked_blocks.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import diffbody_jax
from diffbody_jax.config import load_config
from diffbody_jax.interop.mapping import flatten_params
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.stacked_blocks import scans_layers, stack_blocks, to_model_layout, unstack_blocks
from diffbody_jax.models.variables import random_variables
from diffbody_jax.parallel.sharding import ShardingRules, param_partition_specs
from tests.interop.test_unet_interop import tiny_sdxl_outputs
from tests.torch_ref import needs_torch, optional, randomize_, unet_diffusers_config

diffusers = optional("diffusers")


@pytest.fixture(scope="module")
def tiny_sdxl_controlnet():
    """tiny-sdxl's ControlNet (a depth-2 stack in its last down block and the mid block), unrolled, and its params."""
    module = build_model(load_config("controlnet:variant=tiny-sdxl").model)
    return module, random_variables(module, seed=5)["params"]


def _inputs(module, rng):
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), module.dummy_inputs(2))


def _flat(tree):
    return {k: np.asarray(v) for k, v in flatten_params(tree).items()}


def test_a_scanned_module_holds_the_stacked_layout_of_the_unrolled_one(tiny_sdxl_controlnet):
    module, params = tiny_sdxl_controlnet
    scanned = module.clone(scan_layers=True)
    assert scans_layers(scanned) and not scans_layers(module)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), scanned.param_shapes())
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), stack_blocks(params))
    stacked = scanned.param_shapes()["down_blocks_2"]["attentions_0"]["transformer_blocks"]
    assert stacked["attn1"]["to_q"]["kernel"].shape[0] == 2
    # depth-1 stacks keep their one block as it is
    assert "transformer_blocks_0" in scanned.param_shapes()["down_blocks_1"]["attentions_0"]


def test_stacking_round_trips_exactly_and_refuses_mixed_layouts(tiny_sdxl_controlnet):
    _, params = tiny_sdxl_controlnet
    stacked = stack_blocks(params)
    back = unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for key, value in _flat(params).items():
        np.testing.assert_array_equal(_flat(back)[key], value, err_msg=key)
    assert jax.tree.structure(stack_blocks(stacked)) == jax.tree.structure(stacked)  # no-op on the stacked layout
    assert jax.tree.structure(unstack_blocks(params)) == jax.tree.structure(params)
    # optimizer moments: the dicts inside named tuples are converted as well
    import optax
    moments = optax.adamw(1e-3).init(stacked)
    assert jax.tree.structure(unstack_blocks(moments)) == jax.tree.structure(optax.adamw(1e-3).init(params))
    block = {"transformer_blocks_0": {"w": np.zeros(2)}, "transformer_blocks_2": {"w": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"transformer blocks \[0, 2\]"):
        stack_blocks(block)
    mixed = {"transformer_blocks": {"w": np.zeros((2, 2))}, "transformer_blocks_0": {"w": np.zeros(2)},
             "transformer_blocks_1": {"w": np.zeros(2)}}
    with pytest.raises(ValueError, match="mixed layouts"):
        stack_blocks(mixed)


def test_scanned_forward_and_gradient_equal_the_unrolled_ones(tiny_sdxl_controlnet, rng):
    module, params = tiny_sdxl_controlnet
    scanned = module.clone(scan_layers=True)
    inputs = _inputs(module, rng)

    def loss(m, p):
        down, mid = m.apply({"params": p}, **inputs)
        return sum(jnp.sum(jnp.square(r)) for r in down) + jnp.sum(jnp.square(mid)), (down, mid)

    (value, outs), grads = jax.value_and_grad(lambda p: loss(module, p), has_aux=True)(params)
    (value_s, outs_s), grads_s = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(stack_blocks(params))
    for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(outs_s), strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    assert abs(float(value) - float(value_s)) <= 1e-4 * abs(float(value))
    want, got = _flat(grads), _flat(unstack_blocks(grads_s))
    assert want.keys() == got.keys()
    scale = max(np.abs(v).max() for v in want.values())
    for key in want:
        assert np.abs(want[key] - got[key]).max() <= 1e-5 * scale, key


@needs_torch
def test_a_scanned_unet_loads_diffusers_files_and_writes_them_unchanged(tmp_path, rng):
    ref = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sdxl")).eval()
    randomize_(ref, 7)
    ref.save_pretrained(tmp_path / "src")
    module, params = diffbody_jax.load_pretrained(tmp_path / "src", scan_layers=True)
    assert module.scan_layers and "transformer_blocks" in params["down_blocks_2"]["attentions_0"]

    got, want = tiny_sdxl_outputs(ref, module, params, rng)
    assert np.abs(got - want).max() <= 1e-4

    diffbody_jax.save_pretrained(tmp_path / "ours", module, params)
    name = "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file
    written, source = load_file(tmp_path / "ours" / name), load_file(tmp_path / "src" / name)
    assert written.keys() == source.keys()
    for key, value in source.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_a_stacked_leaf_is_split_as_each_of_its_blocks_would_be(tiny_sdxl_controlnet):
    module, _ = tiny_sdxl_controlnet
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    rules = ShardingRules(fsdp_min_size=64)  # small enough that the tiny model's kernels are split
    plain = _flat_specs(param_partition_specs(module.abstract_variables()["params"], mesh, rules))
    stacked = param_partition_specs(module.clone(scan_layers=True).abstract_variables()["params"], mesh, rules)
    unstacked = _flat_specs(unstack_blocks(jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((2,) * len(s), np.float32, sharding=NamedSharding(mesh, s)), stacked,
        is_leaf=lambda x: isinstance(x, P))))
    assert unstacked.keys() == plain.keys()
    split = 0
    for key, spec in plain.items():
        assert tuple(unstacked[key]) == tuple(spec), key
        split += "fsdp" in tuple(spec)
    assert split > 10
    for key, spec in _flat_specs(stacked).items():
        if "/transformer_blocks/" in key:
            assert spec[0] is None, key


def _flat_specs(tree):
    """{path: spec tuple} of a tree of PartitionSpecs or of ShapeDtypeStructs with NamedShardings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P | jax.ShapeDtypeStruct))[0]
    specs = {}
    for path, leaf in leaves:
        specs["/".join(str(k.key) for k in path)] = tuple(leaf.sharding.spec if hasattr(leaf, "sharding") else leaf)
    return specs


def test_a_group_converts_each_member_by_its_own_layout(tiny_sdxl_controlnet):
    from diffbody_jax.models.group import ModelGroup
    module, params = tiny_sdxl_controlnet
    group = ModelGroup(scanned=module.clone(scan_layers=True), unrolled=module)
    tree = to_model_layout(group, {"scanned": params, "unrolled": stack_blocks(params)})
    assert "transformer_blocks" in tree["scanned"]["mid_block"]["attentions_0"]
    assert "transformer_blocks_1" in tree["unrolled"]["mid_block"]["attentions_0"]


def test_a_scanned_controlnet_starts_from_a_unet_folder_as_the_unrolled_one(tmp_path, tiny_sdxl_controlnet):
    from diffbody_jax.interop.pretrained import init_from_pretrained_unet
    unet = build_model(load_config("unet:variant=tiny-sdxl").model)
    diffbody_jax.save_pretrained(tmp_path, unet, random_variables(unet, seed=9)["params"])
    module, _ = tiny_sdxl_controlnet
    plain, copied, _ = init_from_pretrained_unet(tmp_path, module, jax.random.key(1))
    scanned, copied_scanned, _ = init_from_pretrained_unet(tmp_path, module.clone(scan_layers=True), jax.random.key(1))
    assert copied_scanned == copied and any("transformer_blocks_1" in p for p in copied)
    want, got = _flat(stack_blocks(plain)), _flat(scanned)
    assert want.keys() == got.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
