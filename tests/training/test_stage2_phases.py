"""Stage 2's two phases (seed 002, Eqs. 3-4) on the tiny variants, with every encoder in the step: Eq. 3 overfits one
batch through the prior-fusion ControlNet alone, Eq. 4 through the colour adapter alone (the rest bit-identical);
SDXL's size conditioning comes from the batch; a stage2_controlnet export and an IP-Adapter file start the
colour_adapter phase, which exports IP-Adapter's own layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from diffbody_jax.config import load_config
from diffbody_jax.interop.ip_adapter import original_state_dict, read_ip_adapter
from diffbody_jax.interop.pretrained import load_pretrained, save_pretrained
from diffbody_jax.models.ip_adapter import ip_adapter_of
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.variables import random_variables
from diffbody_jax.training.losses import stage2_inputs
from diffbody_jax.training.phases import caption_tokens, colour_adapter_export
from tests.torch_ref import optional
from tests.training.overfit import overfit_phase

transformers = optional("transformers")
pytestmark = pytest.mark.skipif(transformers is None, reason="CLIP's tokenizers come from transformers")


def _batch(config, rng):
    from skimage import data

    photo = data.astronaut()[::8, ::8].astype(np.float32) / 255  # 64 x 64: latents of 8 x 8
    target = np.stack([photo, photo[:, ::-1]])
    batch = {"target": target, "depth": target.mean(-1, keepdims=True),
             "normal": rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32),
             "pose": rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32),
             "degraded": np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32),
             "original_size": np.array([[512, 512], [300, 512]], np.int32),
             "crop_top_left": np.array([[0, 0], [0, 37]], np.int32),
             "caption": ["a woman in an orange suit", ""], "record": np.array([0, 1]), "epoch": np.array([0, 0])}
    return caption_tokens(config)(batch)


@pytest.fixture(scope="module")
def colour_adapter_variables():
    """Host-drawn variables of the colour_adapter group (stage2_controlnet's members and the CLIP image encoder):
    compiling the group's init would cost minutes here, and neither test needs the training init. The ControlNet
    is random, so it already steers, as the adapter phase finds it after stage2_controlnet (a fresh one outputs
    zeros)."""
    return random_variables(build_model(load_config("colour_adapter:variant=tiny").model), seed=0)


@pytest.mark.parametrize("phase", ["stage2_controlnet", "colour_adapter"])
def test_each_phase_overfits_one_batch_through_its_subset_alone(colour_adapter_variables, rng, phase):
    """Eq. 3 moves the loss through the prior-fusion ControlNet alone, Eq. 4 through the colour adapter alone (the
    adapter only adds cross-attention values: it moves the loss more slowly)."""
    config = load_config(f"{phase}:variant=tiny", ["optim.learning_rate=3e-3"])
    members = set(config.model.members)
    variables = {c: {m: v for m, v in tree.items() if m in members} for c, tree in colour_adapter_variables.items()}
    losses, changed, trainable, frozen = overfit_phase(config, _batch(config, rng), 200, variables)
    assert trainable == ["stage2"] and "stage2" in frozen
    assert losses[-1] <= losses[0] / 2, losses[::10]
    assert changed == []


def test_size_conditioning_comes_from_each_crop(colour_adapter_variables):
    config = load_config("stage2_controlnet:variant=tiny")
    group = build_model(config.model)
    batch = _batch(config, np.random.default_rng(0))
    out = stage2_inputs(group, colour_adapter_variables, {k: jnp.asarray(v) for k, v in batch.items()
                                                          if k not in ("caption", "record", "epoch")})
    np.testing.assert_array_equal(np.asarray(out["time_ids"]), [[512, 512, 0, 0, 64, 64], [300, 512, 0, 37, 64, 64]])
    assert set(out["priors"]) == {"ir", "pose", "depth", "normal"} and out["priors"]["depth"].shape[-1] == 3
    assert out["latents"].shape == (2, 8, 8, 4) and out["prompt_embeds"].shape == (2, 77, 32)


@pytest.mark.slow  # ~100 s on 2 cold cores (the colour_adapter group's init compiles); the suite's budget
def test_a_controlnet_export_and_an_ip_adapter_start_the_colour_adapter_phase(tmp_path):
    from diffbody_jax.training.engine import export_params, init_state, setup

    config = load_config("colour_adapter:variant=tiny")
    group = build_model(config.model)
    fresh = nn.unbox(jax.eval_shape(lambda: group.init(jax.random.key(0))))["params"]["stage2"]
    # what a stage2_controlnet run leaves in export/, and a converted IP-Adapter (`convert ip-adapter-to-flax`)
    cn = group.stage2.controlnet.init_params(jax.random.key(7))
    save_pretrained(tmp_path / "stage2" / "export", group.stage2.controlnet, cn)
    full = group.stage2.init_params(jax.random.key(8))
    ipa_module, ipa = colour_adapter_export(group, {"stage2": full})
    save_pretrained(tmp_path / "ipa", ipa_module, ipa)
    config = load_config("colour_adapter:variant=tiny",
                         [f"train.init_from=stage2/controlnet={tmp_path / 'stage2'},stage2={tmp_path / 'ipa'}"])
    s = setup(config)
    state = init_state(s, config)
    params = state.params["stage2"]
    frozen = state.frozen["stage2"]
    for a, b in zip(jax.tree.leaves(cn), jax.tree.leaves(frozen["controlnet"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(ipa), jax.tree.leaves({"image_proj": params["image_proj"],
                                                           "ip_adapter": ip_adapter_of(params["unet"])}), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the UNet's own params were not touched by the adapter source: still the seeded init
    flat_fresh = traverse_util.flatten_dict(fresh["unet"], sep="/")
    assert set(traverse_util.flatten_dict(frozen["unet"], sep="/")) | set(
        traverse_util.flatten_dict(params["unet"], sep="/")) == set(flat_fresh)

    folder = export_params(s, state, config, tmp_path / "adapter")
    written = read_ip_adapter(folder / "ip_adapter.safetensors")
    expected = original_state_dict({"image_proj": jax.tree.map(np.asarray, params["image_proj"]),
                                    "ip_adapter": jax.tree.map(np.asarray, ip_adapter_of(params["unet"]))},
                                   group.stage2.unet.config)
    assert set(written) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(np.asarray(written[k]), expected[k])
    module, reread = load_pretrained(folder)
    assert type(module).__name__ == "ColourAdapter"
