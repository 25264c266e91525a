"""SwinIR checkpoints: export loads strictly in the official class, errors name keys and shapes, real-size coverage."""


import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.interop.swinir import load_swinir, save_swinir, swinir_from_state_dict, swinir_state_dict
from diffbody_jax.models.swinir import (
    SwinIR,
    SwinIRConfig,
)
from tests.models.test_swinir import CASES, _reference  # noqa: F401
from tests.torch_ref import REPO, spandrel_swinir_class, state_dict_numpy

torch = pytest.importorskip("torch")


def test_export_loads_strictly_in_official_class(tmp_path):
    config = SwinIRConfig(**CASES["pixelshuffle-x3-3conv"])
    ref = _reference(config, seed=0)
    params = swinir_from_state_dict(state_dict_numpy(ref), config)
    fresh = _reference(config, seed=1)
    save_swinir(tmp_path / "swinir.pth", config, params)
    obj = torch.load(tmp_path / "swinir.pth", weights_only=True)
    fresh.load_state_dict(obj["params"], strict=True)  # buffers included, nothing missing or extra
    for key, value in ref.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    # And back: params_ema wins over params, round trip bit-exact.
    torch.save({"params": {}, "params_ema": obj["params"]}, tmp_path / "ema.pth")
    again = load_swinir(tmp_path / "ema.pth", config)
    jax.tree.map(np.testing.assert_array_equal, params, again)
    save_swinir(tmp_path / "swinir.safetensors", config, params)
    jax.tree.map(np.testing.assert_array_equal, params, load_swinir(tmp_path / "swinir.safetensors", config))


def test_wrong_checkpoint_names_keys_and_shapes():
    config = SwinIRConfig(**CASES["denoise"])
    state = swinir_state_dict(config, SwinIR(config).init_params(jax.random.key(0)))
    state["layers.0.residual_group.blocks.0.mlp.fc1.weight"] = np.zeros((5, 24), np.float32)
    del state["conv_last.bias"]
    with pytest.raises(ValueError, match=r"(?s)conv_last/bias.*mlp\.fc1\.weight \(5, 24\)"):
        swinir_from_state_dict(state, config, "bad.pth")


@pytest.mark.parametrize("variant", ["diffbir", "real-sr-x4-l"])
def test_real_config_coverage(variant):
    """Real sizes vs eval_shape: every official key maps and every shape fits (SwinIR is small enough to
    build on the CPU; its constructor cannot run on the meta device)."""
    from diffbody_jax.interop.mapping import plan_import
    from diffbody_jax.interop.swinir import swinir_table

    fields = dict(load_config(f"{REPO}/configs/swinir.py:variant={variant}").model.swinir.to_dict())
    config = SwinIRConfig.from_dict(fields)
    kwargs = config.to_dict()
    del kwargs["_class_name"]
    kwargs["start_unshuffle"] = kwargs.pop("unshuffle_scale")
    ref = spandrel_swinir_class()(**kwargs)  # its constructor calls .item(), so not on the meta device
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.unshuffle_scale > 1:
        shapes = {k.replace("conv_first.", "conv_first.1.", 1): v for k, v in shapes.items()}
    ours = jax.tree.map(lambda s: s.shape, SwinIR(config).param_shapes())
    from diffbody_jax.interop.mapping import flatten_params

    plan = plan_import(shapes, flatten_params(ours), swinir_table(config), variant)
    n_ref = sum(int(np.prod(p.shape)) for p in ref.parameters())
    n_ours = sum(int(np.prod(s)) for s in jax.tree.leaves(ours, is_leaf=lambda x: isinstance(x, tuple)))
    assert len(plan) == len(list(ref.parameters())) and n_ours == n_ref
    # Exported buffers match the official ones in shape (so a strict load accepts them).
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    exported = swinir_state_dict(config, jax.tree.map(lambda s: np.zeros(s, np.float32), ours, is_leaf=is_shape))
    assert {k: v.shape for k, v in exported.items()} == shapes
