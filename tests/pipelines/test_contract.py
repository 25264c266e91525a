"""A trained run's contract reaches restoring (diffbody_jax/diffusion/contract.py): the Restorer samples with the
schedule and prediction type the run trained with (a spy UNet's inputs over three DDPM steps against diffusers'
DDPMScheduler configured from the contract), a weights folder whose stage-1 components trained apart is refused
naming both files, and the contract survives its JSON round trip."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffbody_jax.cli.main import main
from diffbody_jax.config import load_config
from diffbody_jax.diffusion.contract import Contract, contract_from_config, read_contract
from diffbody_jax.diffusion.samplers import step_noise
from diffbody_jax.models.unet import UNet2DConditionModel
from diffbody_jax.pipelines.restore import Restorer, RestoreSettings
from diffbody_jax.pipelines.stand_in import write_stand_in_weights
from diffbody_jax.pipelines.weights import WeightsError, restore_contracts, scheduler_path
from tests.torch_ref import needs_torch, optional

torch = optional("torch")
diffusers = optional("diffusers")
STEPS = 3


def _spy_eps(z, t):
    """The spy UNet's output: a fixed nonlinear function of (z, t), the same in torch below."""
    return 0.9 * z + 0.1 * jnp.tanh(z) * jnp.cos(t.astype(jnp.float32)[:, None, None, None] / 300.0)


def _spy_eps_torch(z, t):
    return 0.9 * z + 0.1 * torch.tanh(z) * torch.cos(torch.as_tensor(float(t)) / 300.0)


@needs_torch
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_restore_samples_with_the_trained_schedule(prediction_type, tmp_path, rng, monkeypatch):
    # a v1 ControlNet trained with this prediction type; the folder's base scheduler (sd21/scheduler) says the
    # other one, so a restore that read the base instead of the run's contract would fail
    overrides = {"v1_controlnet": ["diffusion.scheduler='sd21-768v'", f"diffusion.prediction_type='{prediction_type}'"]}
    weights = write_stand_in_weights(tmp_path / "w", seed=1, versions=("v1",), overrides=overrides)
    base = weights / "sd21" / "scheduler" / "scheduler_config.json"
    base.parent.mkdir()
    other = {"v_prediction": "epsilon", "epsilon": "v_prediction"}[prediction_type]
    base.write_text(json.dumps({**json.loads(scheduler_path(weights, "sd21").read_text()), "prediction_type": other}))
    contract = read_contract(weights / "v1_controlnet")
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, UNet2DConditionModel) and context.method_name == "__call__":
            z, t = args[0], args[1]
            jax.debug.callback(lambda z, t: seen.append((np.asarray(z), np.asarray(t))), z, t)
            return _spy_eps(z, t)
        return next_fun(*args, **kwargs)

    restorer = Restorer(weights, RestoreSettings(version="v1", steps=STEPS, size=64))
    degraded = rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    with nn.intercept_methods(interceptor):
        restorer.restore(key, degraded, np.zeros_like(degraded), ["a person"])
    jax.effects_barrier()
    assert len(seen) == STEPS

    # diffusers' loop, configured from the run's contract, from the same z_T and step noises
    k_noise, k_steps = jax.random.split(key)
    z = np.asarray(jax.random.normal(k_noise, seen[0][0].shape, jnp.float32))
    noises = iter([np.asarray(step_noise(k_steps, i, z.shape)) for i in range(STEPS)])
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.from_numpy(next(noises).copy()))
    scheduler = diffusers.DDPMScheduler.from_config(dict(contract.scheduler))
    assert scheduler.config.prediction_type == prediction_type
    scheduler.set_timesteps(STEPS)
    z = torch.from_numpy(z.copy())
    for i, t in enumerate(scheduler.timesteps):
        z_seen, t_seen = seen[i]
        assert int(t_seen[0]) == int(t)
        np.testing.assert_allclose(z_seen, z.numpy(), atol=1e-5, err_msg=f"step {i}")
        z = scheduler.step(_spy_eps_torch(z, t), t, z).prev_sample


def test_components_trained_apart_are_refused_naming_both(stand_in_weights, tmp_path, capsys):
    folder = tmp_path / "w"
    shutil.copytree(stand_in_weights, folder)
    contracts, notes = restore_contracts(folder, "v2")
    assert not notes and not contracts["stage1"].is_default
    path = folder / "joint_unet" / "contract.json"
    data = json.loads(path.read_text())
    data["latent_stats"] = {"rgb": [0.1, 1.0], "depth": [0.2, 1.2], "normal": [0.6, 0.9], "pose": [-0.3, 1.4]}
    path.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="latent_stats.*stage1_controlnet/contract.json.*joint_unet/contract.json"):
        restore_contracts(folder, "v2")
    assert main(["weights", "check", str(folder), "--configs-only"]) == 1
    out = capsys.readouterr().out
    assert "v2: REFUSED" in out and "v1: ready" in out
    # a component without a contract (converted weights) falls back to the base scheduler, and says so
    (folder / "joint_unet" / "contract.json").unlink()
    (folder / "stage1_controlnet" / "contract.json").unlink()
    contracts, notes = restore_contracts(folder, "v2")
    assert contracts["stage1"].is_default and "no contract.json" in notes[0]


def test_the_contract_round_trips_and_says_what_the_config_says():
    config = load_config("stage1_controlnet:variant=tiny", ["joint.normalize_latents=True",
                                                             "diffusion.prediction_type='v_prediction'",
                                                             "data.pose_style={'threshold': 0.5, 'hands': False, "
                                                             "'face': True}"])
    contract = contract_from_config(config)
    again = Contract.from_json(json.loads(json.dumps(contract.to_json())), "round trip")
    assert again.to_json() == contract.to_json()
    assert contract.component == "stage1_controlnet"
    assert contract.schedule().prediction_type == "v_prediction"
    assert contract.stats()["pose"] == tuple(config.joint.latent_stats["pose"])
    assert (contract.pose().threshold, contract.pose().hands) == (0.5, False)
    with pytest.raises(ValueError, match="unknown contract field"):
        Contract.from_json({**contract.to_json(), "extra": 1}, "bad.json")
