"""Checkpoints hold the file layout (`models.stacked_blocks`): a run that scans its transformer stacks writes them
block by block, so its checkpoint resumes with or without `model.scan_layers` and holds the same arrays."""

import jax
import numpy as np
import optax

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.stacked_blocks import stack_blocks, unstack_blocks
from diffbody_jax.models.variables import random_variables
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.engine import _check_resumable, _config_json
from diffbody_jax.training.state import create_train_state
from diffbody_jax.training.trainable import partition


def _state(params, subset):
    trainable, frozen = partition(params, subset)
    return create_train_state(trainable, frozen, {}, optax.adamw(1e-3), jax.random.key_data(jax.random.key(3)), True)


class _IpKernels:
    """The colour adapter's subset: only the to_k_ip / to_v_ip kernels inside the blocks train."""

    @staticmethod
    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: any(k.key == "to_k_ip" for k in path), params)


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_scanned_runs_checkpoint_resumes_unrolled_and_back(tmp_path):
    module = build_model(load_config("unet:variant=tiny-sdxl").model).clone(ip_adapter=True)
    params = random_variables(module, seed=2)["params"]
    stacked = stack_blocks(params)
    scanned_state = _state(stacked, _IpKernels)
    assert jax.tree.leaves(scanned_state.params) and jax.tree.leaves(scanned_state.frozen)
    step = jax.tree.map(lambda x: x + 1, scanned_state.opt_state)  # moments that differ from their init
    scanned_state = scanned_state.replace(opt_state=step)
    checkpoints = Checkpoints(tmp_path, every=1, keep=2, async_save=False)
    checkpoints.save_frozen(scanned_state.frozen)
    checkpoints.save(1, scanned_state, force=True)
    checkpoints.wait()
    on_disk = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        checkpoints.manager.item_metadata(1)["opt_state"])[0]]
    assert any("['transformer_blocks_1']" in k for k in on_disk)
    assert not any("['transformer_blocks']" in k for k in on_disk)

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for layout, expected in (("unrolled", unstack_blocks(scanned_state)), ("scanned", scanned_state)):
        abstract = jax.eval_shape(lambda s: s, expected)
        shardings = jax.tree.map(lambda _: device, abstract)
        restored = checkpoints.restore(1, abstract, shardings)
        assert jax.tree.structure(restored) == jax.tree.structure(expected), layout
        want, got = _leaves(expected), _leaves(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{layout} {key}")
    checkpoints.close()


def test_a_run_resumes_with_scan_layers_switched():
    config = load_config("stage2_controlnet:variant=tiny")
    saved = _config_json(config)
    config.model.members.stage2.scan_layers = True
    _check_resumable(saved, config, "workdir")  # does not raise: the checkpoints are the same either way
