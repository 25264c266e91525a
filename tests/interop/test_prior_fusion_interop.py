"""Prior-fusion ControlNet weights: folders round-trip, init from a diffusers ControlNet folder."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.interop.mapping import flatten_params, flax_to_torch, torch_to_flax
from diffbody_jax.interop.unet import controlnet_table
from diffbody_jax.models.controlnet import (
    ControlNetModel,
    prior_fusion_from_controlnet,
)
from tests.models.test_prior_fusion import PRIORS, fusion_config, trained  # noqa: F401
from tests.torch_ref import needs_torch, optional

torch = optional("torch")


@needs_torch
def test_weights_round_trip_and_folder(tmp_path, trained):
    fusion = ControlNetModel(fusion_config(fusion_alpha_mode="learned"))
    params, _ = prior_fusion_from_controlnet(trained[2], fusion, jax.random.key(3))
    params = jax.tree.map(np.asarray, params)
    table = controlnet_table(fusion.config)
    sd = flax_to_torch(params, table)
    assert "controlnet_cond_embedding.depth.blocks.1.weight" in sd and "controlnet_cond_embedding.alpha" in sd
    back = torch_to_flax(sd, table, fusion.param_shapes(), "round trip")
    for (ka, a), (kb, b) in zip(sorted(flatten_params(params).items()), sorted(flatten_params(back).items()),
                                strict=True):
        assert ka == kb and a.tobytes() == b.tobytes(), ka
    diffbody_jax.save_pretrained(tmp_path, fusion, params)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["conditioning_embedding_type"] == "prior_fusion" and saved["fusion_alpha_mode"] == "learned"
    again, loaded = diffbody_jax.load_pretrained(tmp_path)
    assert again.config == fusion.config
    assert again.fusion_alphas(loaded) == pytest.approx(fusion.fusion_alphas(params))
    # pixel configs stay diffusers-identical: no fusion fields written
    assert "prior_names" not in dataclasses.replace(fusion.config, conditioning_embedding_type="pixel").to_dict()


@needs_torch
def test_init_from_diffusers_controlnet_folder(tmp_path, trained):
    ref, _, pixel_params = trained
    ref.save_pretrained(tmp_path / "controlnet")
    pixel, loaded = diffbody_jax.load_pretrained(tmp_path / "controlnet")
    fusion = ControlNetModel(fusion_config())
    params, _ = prior_fusion_from_controlnet(loaded, fusion, jax.random.key(0))
    for n in PRIORS:
        for a, b in zip(jax.tree.leaves(params["controlnet_cond_embedding"][n]),
                        jax.tree.leaves(pixel_params["controlnet_cond_embedding"]), strict=True):
            np.testing.assert_array_equal(a, b)
