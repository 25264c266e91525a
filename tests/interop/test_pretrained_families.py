"""SwinIR and the body-part network (with its BatchNorm statistics) as registered families: save_pretrained /
load_pretrained folders and the generic `diffbody convert to-flax | to-torch`, bit-exact both ways."""

import jax
import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.cli.main import main
from diffbody_jax.config import load_config
from diffbody_jax.interop.bodypart import bodypart_state_dict
from diffbody_jax.interop.swinir import swinir_state_dict
from diffbody_jax.interop.torch_files import read_state_dict
from diffbody_jax.models.registry import build_model


def _perturbed(tree, rng):
    return jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.float32), tree)


@pytest.mark.parametrize("spec", ["swinir:variant=tiny-diffbir", "bodypart:variant=tiny"])
def test_folder_and_checkpoint_round_trips(spec, tmp_path, rng, capsys):
    module = build_model(load_config(spec).model)
    variables = _perturbed(module.init_variables(jax.random.key(0)), rng)
    weights = variables if "batch_stats" in variables else variables["params"]
    diffbody_jax.save_pretrained(tmp_path / "model", module, weights)
    # the folder holds the PyTorch layout the family's own exporter writes
    written = read_state_dict(next((tmp_path / "model").glob("*.safetensors")))
    own = bodypart_state_dict(weights) if "batch_stats" in variables else swinir_state_dict(module.config, weights,
                                                                                              buffers=False)
    for key, value in written.items():
        np.testing.assert_array_equal(value, own[key], err_msg=key)
    loaded, back = diffbody_jax.load_pretrained(tmp_path / "model", param_dtype=None)
    assert type(loaded).__name__ == type(module).__name__ and loaded.config == module.config
    jax.tree.map(np.testing.assert_array_equal, back, weights)

    assert main(["convert", "to-flax", "--src", str(tmp_path / "model"), "--dst", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "again")]) == 0
    _, again = diffbody_jax.load_pretrained(tmp_path / "again", param_dtype=None)
    jax.tree.map(np.testing.assert_array_equal, again, weights)
    _, from_ckpt = diffbody_jax.load_pretrained(tmp_path / "ckpt", param_dtype=None)
    jax.tree.map(np.testing.assert_array_equal, from_ckpt, weights)
