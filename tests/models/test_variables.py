"""One way to create variables for every top module; every param and statistic carries logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from diffbody_jax.models.hrnet import HRNet
from diffbody_jax.models.ip_adapter import Resampler
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import abstract_variables, init_variables, param_shapes, unnamed_leaves
from tests.eight_devices import outputs
from tests.torch_ref import hrnet_config, resampler_config

CONFIG_SPECS = ["unet:variant=tiny-sd21", "unet:variant=tiny-sdxl", "controlnet:variant=tiny-v1",
                "controlnet:variant=tiny-v2-stage2", "joint_unet:variant=tiny", "stage2:variant=tiny",
                "swinir:variant=tiny", "vae:variant=tiny", "bodypart:variant=tiny"]


def _top_modules():
    mods = {spec: build_model(load_config(spec).model) for spec in CONFIG_SPECS}
    mods["clip-text"] = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     max_position_embeddings=16, projection_dim=8,
                                                     with_projection=True))
    mods["clip-vision"] = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=28, patch_size=7))
    mods["resampler"] = Resampler(resampler_config())
    mods["hrnet"] = HRNet(config=hrnet_config(incre_planes=()))
    return mods


@pytest.mark.parametrize("name", [*CONFIG_SPECS, "clip-text", "clip-vision", "resampler", "hrnet"])
def test_every_leaf_has_logical_axis_names(name):
    module = _top_modules()[name]
    abstract = abstract_variables(module)
    assert abstract["params"], name
    assert unnamed_leaves(abstract) == [], name
    # the unboxed shapes are what init gives, and the names fit every shape
    shapes = param_shapes(module)
    assert jax.tree.structure(shapes) == jax.tree.structure(nn.unbox(abstract)["params"])
    specs = nn.get_partition_spec(abstract)
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                          jax.tree.leaves(nn.unbox(abstract)), strict=True):
        assert len(spec) == len(leaf.shape)


def test_unnamed_leaf_is_reported():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("w", nn.initializers.ones_init(), (3,))

        def dummy_inputs(self, batch=1):
            return {"x": jnp.zeros((batch, 3))}

    assert unnamed_leaves(abstract_variables(Bare())) == ["['params']['w']"]


def test_init_variables_matches_abstract_and_keeps_batch_stats():
    module = _top_modules()["bodypart:variant=tiny"]
    variables = init_variables(module, jax.random.key(0))
    assert set(variables) == {"params", "batch_stats"}
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(abstract_variables(module)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), variables) == want


def test_activation_constraints_take_effect_on_a_mesh(eight_devices):
    """On 8 host devices (the suite's 8-device subprocess, tests/eight_devices.py) with the rule batch -> data, the
    block-boundary constraints appear in the program (none without a mesh) and the output is unchanged."""
    folder, _ = eight_devices
    text = open(outputs(folder, "activation_constraints") + ".txt").read()
    plain, constrained, err = text.split()
    assert int(plain) == 0 and int(constrained) > 10, text
    assert float(err) <= 1e-5
