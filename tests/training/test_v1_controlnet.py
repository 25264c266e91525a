"""The v1_controlnet phase (seed 000) on its tiny variant: the loss overfits one batch through the ControlNet alone
with every other member bit-identical; a run starts its SwinIR from a stage-0 export and exports its ControlNet in
the diffusers layout, which `load_pretrained` reads back with identical tensors (diffusers itself has no
latent-condition ControlNet class: tests/interop/test_controlnet_interop.py). Captions go through CLIP's tokenizer
(transformers)."""

import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.interop.pretrained import load_pretrained, save_pretrained
from diffbody_jax.models.registry import build_model
from diffbody_jax.training.checkpoint import Checkpoints
from diffbody_jax.training.engine import setup, train
from diffbody_jax.training.phases import caption_tokens
from tests.torch_ref import optional
from tests.training.overfit import overfit_phase

transformers = optional("transformers")
pytestmark = pytest.mark.skipif(transformers is None, reason="CLIP's tokenizer comes from transformers")


def _batch(config, rng):
    from skimage import data

    photo = data.astronaut()[::8, ::8].astype(np.float32) / 255  # 64 x 64
    batch = {"target": np.stack([photo, photo[:, ::-1]]), "pose": rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32),
             "caption": ["a woman in an orange suit", ""], "record": np.array([0, 1]), "epoch": np.array([0, 0])}
    batch["degraded"] = np.clip(batch["target"] + rng.normal(0, 0.05, batch["target"].shape), 0, 1).astype(np.float32)
    return caption_tokens(config)(batch)


def test_the_loss_overfits_one_batch_through_the_controlnet_alone(rng):
    """Fixed t and noise (the loss's key pinned): at most 80 Adam steps to halve Eq. 4's loss."""
    config = load_config("v1_controlnet:variant=tiny")
    losses, changed, trainable, frozen = overfit_phase(config, _batch(config, rng), 80)
    assert trainable == ["controlnet"] and frozen == ["bodypart", "swinir", "text_encoder", "unet", "vae"]
    assert losses[-1] <= losses[0] / 2, losses[::10]
    assert changed == []


def test_the_phase_starts_from_a_stage0_export_and_exports_its_controlnet(tmp_path):
    """The hand-off without training: init_state places the stage-0 export into the frozen SwinIR member, and
    export_params writes the ControlNet member (the engine's own export path) with the run's contract beside it."""
    from diffbody_jax.diffusion.contract import read_contract
    from diffbody_jax.training.engine import export_params, init_state

    swinir = build_model(load_config("swinir:variant=tiny-diffbir").model)
    swinir_params = swinir.init_params(jax.random.key(11))
    save_pretrained(tmp_path / "stage0" / "export", swinir, swinir_params)
    config = load_config("v1_controlnet:variant=tiny", [f"train.init_from=swinir={tmp_path / 'stage0'}",
                                                         "diffusion.prediction_type='v_prediction'",
                                                         "data.pose_style={'threshold': 0.4, 'hands': False, "
                                                         "'face': False}"])
    s = setup(config)
    state = init_state(s, config)
    for a, b in zip(jax.tree.leaves(swinir_params), jax.tree.leaves(state.frozen["swinir"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    folder = export_params(s, state, config, tmp_path / "v1")
    module, exported = load_pretrained(folder)
    assert type(module).__name__ == "ControlNetModel" and module.config.conditioning_channels == 9
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state.params["controlnet"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    contract = read_contract(folder)  # what restoring will feed this ControlNet
    assert contract.phase == "v1_controlnet" and contract.schedule().prediction_type == "v_prediction"
    assert (contract.attention, contract.pose().threshold, contract.pose().hands) == ("model", 0.4, False)
    assert contract.buckets == ((64, 64),) and contract.text["fallback"] == config.text.fallback


@pytest.mark.slow  # ~2 minutes on 2 cold cores (the six-member step compiles); the hand-off above runs by default
def test_a_run_starts_from_a_stage0_export_and_exports_its_controlnet(tmp_path):
    manifest = write_sample_set(tmp_path / "sample")
    swinir_config = load_config("swinir:variant=tiny-diffbir")
    swinir = build_model(swinir_config.model)
    swinir_params = swinir.init_params(jax.random.key(11))
    save_pretrained(tmp_path / "stage0" / "export", swinir, swinir_params)  # what a swinir run leaves

    overrides = [f"data.manifest={manifest}", "train.steps=2", "checkpoint.every=2",
                 f"train.init_from=swinir={tmp_path / 'stage0'}", "data.degradation=blur2-noise40"]
    config = load_config("v1_controlnet:variant=tiny", overrides)
    result = train(config, tmp_path / "v1")
    s = setup(config)
    state = Checkpoints(tmp_path / "v1", 1, 3).restore(2, s.abstract_state, s.state_shardings)
    for a, b in zip(jax.tree.leaves(swinir_params), jax.tree.leaves(state.frozen["swinir"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    module, exported = load_pretrained(result.export)
    assert type(module).__name__ == "ControlNetModel" and module.config.conditioning_channels == 9
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state.params["controlnet"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
