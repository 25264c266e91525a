"""A run our engine trained restores through `diffbody restore` with exactly what it trained with.

One stage-1 ControlNet run (tiny, one step) with v-prediction and normalised latents, on a manifest whose one line
shows no person (`"keypoints": []`), started from a joint UNet export as README chains the phases (`train.init_from`
joint_unet=EXPORT, controlnet=unet:EXPORT): the ControlNet starts from the joint UNet's RGB branch (one Adam step
moves a parameter by at most the learning rate, so the export is within lr of that copy); the engine draws the
no-person line as an all-black pose map and trains through it; the export is put into the stand-in weights folder
whose joint UNet started it, and restored with `diffbody restore --version v2`. At the joint UNet's
boundary the restore's inputs are checked against independent constructions: the pose latent equals the VAE's
encoding of the given pose map normalised with the run's statistics (float64), the timesteps and the z_t sequence
equal diffusers' DDIMScheduler configured with the run's prediction type, stepping on the joint UNet's own outputs."""

import json
import pathlib
import shutil

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from PIL import Image

from diffbody_jax.cli.main import main
from diffbody_jax.config import load_config
from diffbody_jax.data.sample_set import write_sample_set
from diffbody_jax.interop.pretrained import load_pretrained
from diffbody_jax.models.controlnet import controlnet_from_joint_unet
from diffbody_jax.models.joint_unet import JointUNet
from diffbody_jax.models.vae import AutoencoderKL
from diffbody_jax.pipelines.stand_in import write_stand_in_weights
from diffbody_jax.training.engine import train
from tests.torch_ref import needs_torch, optional

torch = optional("torch")
diffusers = optional("diffusers")
STEPS = 3
CONFIGS = pathlib.Path(__file__).parents[2] / "configs" / "diffusers"
RGB_STATS, POSE_STATS = [0.14, 1.04], [0.31, 1.7]  # far apart, so a restore without the run's statistics fails
RUN = ["joint.normalize_latents=True", "diffusion.prediction_type='v_prediction'",
       f"joint.latent_stats={{'rgb': {RGB_STATS}, 'depth': [0.21, 1.2], 'normal': [0.6, 0.91], 'pose': {POSE_STATS}}}"]


def _manifest_with_a_no_person_line(folder):
    manifest = write_sample_set(folder, stand_in_priors=True)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["keypoints"] = []  # what `diffbody annotate --manifest` writes for a photo with no person
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, 1  # its record index


@needs_torch
def test_an_engine_run_with_a_no_person_line_restores_with_its_schedule_and_statistics(tmp_path, rng):
    manifest, no_person = _manifest_with_a_no_person_line(tmp_path / "sample")
    weights = write_stand_in_weights(tmp_path / "w", seed=2, versions=("v2",), overrides={"stage1_controlnet": RUN})
    joint_export = weights / "joint_unet"
    config = load_config("stage1_controlnet:variant=tiny", [
        f"data.manifest={manifest}", "train.steps=1", "checkpoint.every=1", *RUN,
        f"train.init_from=joint_unet={joint_export},controlnet=unet:{joint_export}"])
    batches = []
    result = train(config, tmp_path / "run", batch_hook=lambda step, batch: batches.append(batch) or batch)
    assert np.isfinite(result.metrics["loss"])
    (batch,) = batches
    assert sorted(batch["record"]) == [0, 1, 2, 3]  # the one step drew every line
    for record, pose in zip(batch["record"], batch["pose"], strict=True):
        assert (pose.max() == 0) == (record == no_person), record  # black for the no-person line only

    # the hand-off: the exported ControlNet is the joint UNet's RGB-branch copy moved by one Adam step (<= lr)
    joint, joint_params = load_pretrained(joint_export)
    controlnet, exported = load_pretrained(result.export)
    expected, copied = controlnet_from_joint_unet(joint_params, joint.config, controlnet, jax.random.key(0))
    assert "conv_in/kernel" in copied and any(p.startswith("down_blocks_0/") for p in copied)
    flat_exported, flat_expected = (traverse_util.flatten_dict(p, sep="/") for p in (exported, expected))
    lr = config.optim.learning_rate
    for path in copied:
        moved = np.abs(np.asarray(flat_exported[path]) - np.asarray(flat_expected[path])).max()
        assert moved <= lr * (1 + 1e-3), (path, moved, lr)

    shutil.rmtree(weights / "stage1_controlnet")
    shutil.copytree(result.export, weights / "stage1_controlnet")

    photo = (rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)
    pose_map = np.zeros((64, 64, 3), np.uint8)
    pose_map[20:44, 28:36] = (255, 85, 0)  # a limb-like bar
    (tmp_path / "in").mkdir()
    (tmp_path / "poses").mkdir()
    Image.fromarray(photo).save(tmp_path / "in" / "p.png")
    Image.fromarray(pose_map).save(tmp_path / "poses" / "p.png")
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, JointUNet) and context.method_name == "__call__":
            z, t = (*args, kwargs.get("sample"), kwargs.get("timesteps"))[:2] if args else (kwargs["sample"],
                                                                                          kwargs["timesteps"])
            jax.debug.callback(lambda *a: seen.append([np.asarray(x, np.float64) for x in a]), z, t, out)
        return out

    with nn.intercept_methods(interceptor):
        assert main(["restore", str(tmp_path / "in"), "--weights", str(weights), "--version", "v2", "--size", "64",
                     "--sampler", "ddim", "--steps", str(STEPS), "--poses", str(tmp_path / "poses"),
                     "--annotator", "none", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    jax.effects_barrier()
    assert len(seen) == STEPS and (tmp_path / "out" / "p.png").exists()

    # the pose latent: the VAE's posterior mode of the pose map, scaled, then moved from the run's pose statistics
    # onto its RGB latents' statistics (the authors' --normalize_dist)
    vae, vae_params = load_pretrained(weights / "sd21" / "vae")
    posterior = vae.apply({"params": vae_params}, pose_map[None].astype(np.float32) / 255 * 2 - 1,
                          method=AutoencoderKL.encode)
    mean = np.asarray(posterior.mode(), np.float64) * vae.config.scaling_factor
    expected_c_p = (mean - POSE_STATS[0]) / POSE_STATS[1] * RGB_STATS[1] + RGB_STATS[0]
    branches = np.split(seen[0][0], 3, axis=-1)  # rgb, depth, normal: each [z_t of the branch, c_p]
    for branch in branches:
        np.testing.assert_allclose(branch[..., 4:], expected_c_p, atol=1e-4)

    # the schedule: diffusers' DDIM from the run's scheduler config and prediction type, on the UNet's outputs
    scheduler_config = json.loads((CONFIGS / config.diffusion.scheduler / "scheduler" /
                                   "scheduler_config.json").read_text())
    scheduler = diffusers.DDIMScheduler.from_config({**scheduler_config, "prediction_type": "v_prediction"})
    scheduler.set_timesteps(STEPS)
    z = _latents(seen[0][0])
    for i, t in enumerate(scheduler.timesteps):
        x, t_seen, out = seen[i]
        assert int(np.ravel(t_seen)[0]) == int(t), i
        np.testing.assert_allclose(_latents(x), z, atol=1e-4, err_msg=f"step {i}")
        z = scheduler.step(torch.from_numpy(_latents(out, inputs=False)), t, torch.from_numpy(z)).prev_sample.numpy()


def _latents(x, inputs=True):
    """The branches' z_t (branch-major, 4 channels each) of the joint UNet's input (z_t and c_p per branch) or
    output, NHWC -> NCHW for diffusers."""
    parts = [p[..., :4] for p in np.split(x, 3, axis=-1)] if inputs else np.split(x, 3, axis=-1)
    return np.concatenate(parts, axis=-1).transpose(0, 3, 1, 2).copy()

