"""The pretrained-base phases (configs/base_unet.py): the real variants train exactly the downloaded UNet; each tiny
base overfits one batch through its UNet alone; SDXL's size conditioning and captions reach the UNet as a hand
construction feeds them; the phase starts from an autoencoder export and exports a UNet with its contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffbody_jax.conditioning.prompts import sdxl_prompt_embeds
from diffbody_jax.config import load_config
from diffbody_jax.diffusion.contract import read_contract
from diffbody_jax.diffusion.losses import noising
from diffbody_jax.interop.pretrained import load_pretrained, save_pretrained
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.vae import images_to_latents
from diffbody_jax.models.variables import random_variables
from diffbody_jax.training.engine import export_params, init_state, setup
from diffbody_jax.training.phases import caption_tokens, diffusion_switches, get_phase
from tests.torch_ref import optional
from tests.training.overfit import overfit_phase

transformers = optional("transformers")
pytestmark = pytest.mark.skipif(transformers is None, reason="CLIP's tokenizers come from transformers")

UNET_PARAMS = {"sd21-base": 865_910_724, "sdxl-base": 2_567_463_684}  # measured on the meta device (shared/)


@pytest.mark.parametrize("variant", sorted(UNET_PARAMS))
def test_a_real_variant_trains_exactly_the_downloaded_unet(variant):
    config = load_config(f"base_unet:variant={variant}")
    params = nn.unbox(build_model(config.model).abstract_variables())["params"]
    trainable, total = get_phase(config.phase).trainable(config).count(params)
    assert trainable == UNET_PARAMS[variant] and total > trainable
    jax.clear_caches()


def _batch(config, rng):
    from skimage import data

    photo = data.astronaut()[::8, ::8].astype(np.float32) / 255  # 64 x 64
    batch = {"target": np.stack([photo, photo[:, ::-1]]), "caption": ["a woman in an orange suit", "an astronaut"],
             "record": np.array([0, 1]), "epoch": np.array([0, 0]),
             "original_size": np.array([[512, 512], [300, 512]], np.int32),
             "crop_top_left": np.array([[0, 0], [0, 37]], np.int32)}
    return caption_tokens(config)(batch)


@pytest.mark.parametrize("variant", ["tiny-sd21", "tiny-sdxl"])
def test_a_tiny_base_overfits_one_batch_through_its_unet_alone(rng, variant):
    config = load_config(f"base_unet:variant={variant}", ["text.drop_prob=0.0"])
    variables = random_variables(build_model(config.model), seed=int(rng.integers(1 << 30)))
    losses, changed, trainable, frozen = overfit_phase(config, _batch(config, rng), 200, variables)
    assert trainable == ["unet"] and "unet" not in frozen and "vae" in frozen
    assert losses[-1] <= losses[0] / 2, losses[::10]
    assert changed == []


def test_sdxl_captions_and_size_conditioning_reach_the_unet(rng):
    """The loss of the phase equals the UNet applied by hand to the same noised latents, with the captions'
    embeddings and time_ids written out as SDXL's (original H, W, crop top, left, target H, W)."""
    config = load_config("base_unet:variant=tiny-sdxl", ["text.drop_prob=0.0"])
    group = build_model(config.model)
    variables = random_variables(group, seed=int(rng.integers(1 << 30)))
    batch = {k: jnp.asarray(v) for k, v in _batch(config, rng).items() if k not in ("caption", "record", "epoch")}
    loss_fn = get_phase(config.phase).loss_fn(group, config)
    key = jax.random.key(4)
    loss, _ = jax.jit(loss_fn)(variables, batch, key)

    p = variables["params"]
    x0 = images_to_latents(group.vae, p["vae"], batch["target"])
    text = sdxl_prompt_embeds(group.text_encoder, p["text_encoder"], batch["input_ids"], group.text_encoder_2,
                              p["text_encoder_2"], batch["input_ids_2"])
    acp = diffusion_switches(config)["alphas_cumprod"]
    t, eps, z_t = noising(key, x0, acp)
    time_ids = jnp.asarray([[512, 512, 0, 0, 64, 64], [300, 512, 0, 37, 64, 64]], jnp.float32)
    pred = group.unet.apply({"params": p["unet"]}, z_t, t, text.prompt_embeds, text_embeds=text.text_embeds,
                            time_ids=time_ids)
    want = np.mean((np.asarray(pred, np.float64) - np.asarray(eps, np.float64)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    moved = dict(batch, original_size=jnp.asarray([[1024, 1024], [300, 512]], jnp.int32))
    assert float(jax.jit(loss_fn)(variables, moved, key)[0]) != float(loss)  # the size conditioning is used


def test_the_phase_starts_from_an_autoencoder_export_and_exports_its_unet(tmp_path):
    """The hand-off without training: init_state places the autoencoder's export into the frozen VAE member, and
    export_params writes the UNet (the engine's own export path) with the run's contract beside it."""
    vae = build_model(load_config("vae:variant=tiny").model)
    vae_params = random_variables(vae, seed=1)["params"]
    save_pretrained(tmp_path / "vae" / "export", vae, vae_params)
    config = load_config("base_unet:variant=tiny-sd21", [f"train.init_from=vae={tmp_path / 'vae'}"])
    s = setup(config)
    state = init_state(s, config)
    for a, b in zip(jax.tree.leaves(vae_params), jax.tree.leaves(state.frozen["vae"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    folder = export_params(s, state, config, tmp_path / "unet")
    module, exported = load_pretrained(folder)
    assert type(module).__name__ == "UNet2DConditionModel"
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state.params["unet"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    contract = read_contract(folder)  # what restoring and the next phases read
    assert contract.phase == "base_unet" and contract.schedule().prediction_type == "epsilon"
    assert contract.text["drop_prob"] == 0.1
