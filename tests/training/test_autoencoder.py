"""The autoencoder phase (configs/vae.py): LDM's L1 + KL loss against the formula in float64 numpy, the decoder-only
subset of a real variant against diffusers' own AutoencoderKL, and a tiny run that learns and exports a VAE whose
scaling factor brings its latents to about unit variance."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from diffbody_jax.config import load_config
from diffbody_jax.data.manifest import read_manifest
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.interop.pretrained import load_pretrained, save_pretrained
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.vae import AutoencoderKL
from diffbody_jax.training.engine import train
from diffbody_jax.training.losses import autoencoder_loss
from diffbody_jax.training.phases import get_phase
from tests.torch_ref import optional

diffusers = optional("diffusers")
torch = optional("torch")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_sample_set(tmp_path_factory.mktemp("sample"))


def test_loss_is_ldms_l1_plus_weighted_kl(rng):
    vae = build_model(load_config("vae:variant=tiny").model)
    params = vae.init_params(jax.random.key(int(rng.integers(1 << 30))))
    images = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    key, kl_weight = jax.random.key(5), 0.25  # a large weight, so a wrong KL term shows in the total
    loss, metrics = jax.jit(lambda p, x: autoencoder_loss(vae, p, x, key, kl_weight=kl_weight))(params, images)

    x = images.astype(np.float64) * 2 - 1
    posterior = vae.apply({"params": params}, x.astype(np.float32), method=AutoencoderKL.encode)
    mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
    eps = np.asarray(jax.random.normal(key, mean.shape), np.float64)  # the draw the posterior sample makes
    z = mean + np.exp(0.5 * logvar) * eps
    decoded = np.asarray(vae.apply({"params": params}, z.astype(np.float32), method=AutoencoderKL.decode), np.float64)
    l1 = np.abs(x - decoded).sum(axis=(1, 2, 3)).mean()
    kl = (0.5 * (mean**2 + np.exp(logvar) - 1 - logvar)).sum(axis=(1, 2, 3)).mean()
    np.testing.assert_allclose(float(loss), l1 + kl_weight * kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["l1"]), np.abs(x - decoded).mean(), rtol=1e-5)


@pytest.mark.skipif(diffusers is None or torch is None, reason="diffusers' AutoencoderKL is the reference")
def test_a_real_variant_fine_tunes_exactly_sds_decoder():
    """configs/vae.py:variant=sd21-base trains decoder.* and post_quant_conv.* of SD2.1's VAE, counted on
    diffusers' AutoencoderKL built on the meta device."""
    config = load_config("vae:variant=sd21-base")
    subset = get_phase(config.phase).trainable(config)
    n_trainable, n_all = subset.count(build_model(config.model).param_shapes())
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in config.model.diffusers.to_dict().items()
                                         if not k.startswith("_")})
    counts = {name: p.numel() for name, p in ref.named_parameters()}
    want = sum(n for name, n in counts.items() if name.startswith(("decoder.", "post_quant_conv.")))
    assert (n_trainable, n_all) == (want, sum(counts.values()))


def test_a_tiny_run_learns_and_exports_a_calibrated_vae(manifest, tmp_path):
    overrides = [f"data.manifest={manifest}", "train.steps=30", "data.batch_size=4", "train.log_every=1",
                 "data.buckets=[[32, 32]]", "checkpoint.every=30", "autoencoder.calibrate_batches=2",
                 "data.degradation=blur2-noise40"]
    result = train(load_config("vae:variant=tiny", overrides), tmp_path / "vae")
    rows = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["l1"] for r in rows[:5]]), np.mean([r["l1"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)
    vae, params = load_pretrained(result.export)
    assert isinstance(vae, AutoencoderKL)
    assert vae.config.scaling_factor != build_model(load_config("vae:variant=tiny").model).config.scaling_factor
    # the exported scale brings the latents of the training photos (whole, not the run's crops) near unit variance
    images = np.stack([np.asarray(Image.open(r.image).convert("RGB").resize((32, 32)), np.float32) / 255
                       for r in read_manifest(manifest)])
    latents = vae.apply({"params": params}, images * 2 - 1, method=AutoencoderKL.encode_latents)
    assert 0.7 < float(np.std(np.asarray(latents))) < 1.4

    # a decoder-only run from that export: refused until its config takes the export's scale (which changes what
    # the weights mean, not a shape); then the encoder and the scale stay bit for bit
    save_pretrained(tmp_path / "base", vae, params)
    fine_tune = [*overrides, "train.steps=2", "autoencoder.trainable=decoder", f"train.init_from={tmp_path / 'base'}"]
    with pytest.raises(ValueError, match=r"config differs from the model's in scaling_factor \(file 0\.\d+"):
        train(load_config("vae:variant=tiny", fine_tune), tmp_path / "refused")
    again = train(load_config("vae:variant=tiny", [
        *fine_tune, f"model.diffusers.scaling_factor={vae.config.scaling_factor!r}"]), tmp_path / "ft")
    vae2, params2 = load_pretrained(again.export)
    assert vae2.config.scaling_factor == vae.config.scaling_factor
    for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(params2["encoder"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["decoder"]),
                                                         jax.tree.leaves(params2["decoder"]), strict=True))
