"""Training phases and losses: the registry, stage 0's SwinIR L2 loss (pure JAX; stage 2's are in test_stage2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
from diffbody_jax.training.losses import swinir_l2_loss
from diffbody_jax.training.phases import PHASES, get_phase
from tests.torch_ref import REPO

TINY = dict(img_size=16, embed_dim=24, depths=(2, 2), num_heads=(2, 3), window_size=4, mlp_ratio=2.0)


def test_l2_loss_trains_and_drop_path_is_random(rng):
    config = SwinIRConfig(**dict(TINY, upsampler="", upscale=1, drop_path_rate=0.5))
    module = SwinIR(config)
    params = module.init_params(jax.random.key(0))
    clean = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 3)), jnp.float32)
    noisy = jnp.clip(clean + 0.1 * jnp.asarray(rng.standard_normal(clean.shape), jnp.float32), 0, 1)
    loss = swinir_l2_loss(module, params, noisy, clean)
    assert float(loss) == pytest.approx(float(jnp.mean((module.apply({"params": params}, noisy) - clean) ** 2)))
    a = swinir_l2_loss(module, params, noisy, clean, jax.random.key(1))
    b = swinir_l2_loss(module, params, noisy, clean, jax.random.key(2))
    assert float(a) != float(b)
    grads = jax.grad(lambda p: swinir_l2_loss(module, p, noisy, clean))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    step = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    assert float(swinir_l2_loss(module, step, noisy, clean)) < float(loss)


def test_phase_registry_builds_and_trains_only_its_subset(rng):
    assert set(PHASES) == {"autoencoder", "base_unet", "base_unet_sdxl", "swinir", "bodypart", "v1_controlnet",
                           "stage1_joint_unet", "stage1_controlnet", "stage2_controlnet", "colour_adapter"}
    phase = get_phase("swinir")
    config = load_config(f"{REPO}/configs/swinir.py:variant=tiny-diffbir")
    module = build_model(config.model)
    params = module.init_params(jax.random.key(0))
    assert phase.subset.count(params)[0] == phase.subset.count(params)[1]  # stage 0 trains all of SwinIR
    x = jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 3)), jnp.float32)
    batch = {"degraded": x, "target": jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 3)), jnp.float32)}
    loss, _ = phase.loss_fn(module, config)({"params": params}, batch, jax.random.key(1))
    assert np.isfinite(float(loss))
    assert float(loss) == float(swinir_l2_loss(module, params, batch["degraded"], batch["target"], jax.random.key(1)))
    # a super-resolving variant cannot regress at the input's size: refused before anything is traced
    x2 = load_config(f"{REPO}/configs/swinir.py:variant=tiny")
    with pytest.raises(ValueError, match="model variant 'tiny' outputs 2x its input"):
        phase.loss_fn(build_model(x2.model), x2)
    with pytest.raises(ValueError, match="unknown training phase 'stage9'"):
        get_phase("stage9")
