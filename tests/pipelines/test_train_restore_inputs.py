"""Training and restoring build the same model inputs (diffbody_jax/diffusion/contract.py, issue 29).

For each phase with a restore path, one batch is handed to the phase's loss and the same photo, pose and prompt to
the pipeline; the arguments each reaches its model with are captured at the model boundary (flax's method
interceptor, a debug callback out of the compiled program) and compared (1e-6). The noisy latent and timestep differ
by design (the loss draws them); so does everything docs/restoring.md lists under "training and restoring differ by
design", which is compared by feeding both sides the same images and sizes. Each loss is then recomputed in float64
from the paper's equation and what its model saw (z_t, t, the condition, the stubbed output), so a swapped channel,
a missing scale or a noise shared between branches fails. The groups have host-drawn random weights.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffbody_jax.conditioning.prompts import load_tokenizer, tokenize
from diffbody_jax.config import load_config
from diffbody_jax.diffusion.contract import contract_from_config
from diffbody_jax.diffusion.samplers import SamplerConfig
from diffbody_jax.models.controlnet import ControlNetModel
from diffbody_jax.models.joint_unet import JointUNet
from diffbody_jax.models.registry import build_model
from diffbody_jax.models.unet import UNet2DConditionModel
from diffbody_jax.models.vae import images_to_latents
from diffbody_jax.models.variables import random_variables
from diffbody_jax.pipelines.v1 import V1Pipeline
from diffbody_jax.training.losses import stage1_loss, v1_controlnet_loss

ATOL = 1e-6
# The denoisers' own outputs are not under test here (their parity with diffusers is tests/models'): each is stubbed
# by a known function of its noisy input, 0.5 z_t, so that the loss can be recomputed from what the model saw.
UNET_STUB = {UNet2DConditionModel: lambda args: 0.5 * args[0]}


def _joint_stub(args):  # [z_k, c_p] per branch -> 0.5 z_k per branch
    parts = jnp.split(args[0], args[0].shape[-1] // 8, axis=-1)
    return jnp.concatenate([0.5 * p[..., :4] for p in parts], axis=-1)


JOINT_STUB = {JointUNet: _joint_stub}
PROMPT = "a woman in a red coat"


@contextlib.contextmanager
def captured(*classes, stub=()):
    """{class name: (args, kwargs)} of the first call of each class's __call__, as host arrays: a debug callback
    sends the traced arguments out of the compiled program (inside jit and the sampler's scan alike).
    stub: {class: fn(args) -> output} run in place of those models (the last model of a chain: only its inputs are
    under test, and not compiling it keeps the test within its time)."""
    calls, stub = {}, dict(stub)

    def interceptor(next_fun, args, kwargs, context):
        name = type(context.module).__name__
        # (a call with keyword arguments only is an init or a shape check while weights load: passed through)
        if context.method_name == "__call__" and isinstance(context.module, classes) and args:
            leaves, tree = jax.tree.flatten(args)
            keep = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array | np.ndarray)]

            def record(*xs, name=name, tree=tree, leaves=leaves, keep=keep):
                values = list(leaves)
                for i, x in zip(keep, xs, strict=True):
                    values[i] = np.asarray(x)
                calls.setdefault(name, (jax.tree.unflatten(tree, values), {}))

            jax.debug.callback(record, *[leaves[i] for i in keep])
            if type(context.module) in stub:
                return stub[type(context.module)](args)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield calls


def _alphas_cumprod(contract) -> np.ndarray:
    """diffusers' alphas_cumprod for the contract's scheduler, in float64 (the reference's own schedule)."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler.from_config(dict(contract.scheduler)).alphas_cumprod.double().numpy()


def _noise_of(z_t, x0, a):
    """eps from z_t = sqrt(a) x0 + sqrt(1 - a) eps, float64 (a: [B])."""
    a = a[:, None, None, None]
    return (np.asarray(z_t, np.float64) - np.sqrt(a) * x0) / np.sqrt(1.0 - a)


def _variables(group, seed: int):
    """Host-drawn random weights (`random_variables`: no init to compile); ControlNet outputs are not zero there,
    so the condition reaches the model's output."""
    return jax.tree.map(jnp.asarray, random_variables(group, seed))


@pytest.fixture(scope="module")
def v1_world():
    config = load_config("v1_controlnet:variant=tiny")
    group = build_model(config.model)
    return config, group, _variables(group, 3)


def _batch(rng, b=2, size=64):
    degraded = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    target = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    pose = (rng.uniform(0, 1, (b, size, size, 3)) > 0.9).astype(np.float32)
    mask = (rng.uniform(0, 1, (b, size, size, 1)) > 0.5).astype(np.float32)
    ids = tokenize(load_tokenizer(None, "!"), [PROMPT] * b)
    return {"degraded": degraded, "target": target, "pose": pose, "mask": mask, "input_ids": ids}


@pytest.mark.parametrize("attention", ["model", "mask"])
def test_v1_loss_and_pipeline_feed_the_controlnet_alike(v1_world, rng, attention):
    config, group, variables = v1_world
    batch = _batch(rng)
    contract = contract_from_config(config)
    alphas = jnp.asarray(contract.schedule().alphas_cumprod())
    with captured(ControlNetModel, UNet2DConditionModel, stub=UNET_STUB) as train:
        loss = jax.jit(lambda v, b, k: v1_controlnet_loss(group, v, b, k, alphas, attention=attention))
        value = float(loss(variables, batch, jax.random.key(0))[0])
    pipe = V1Pipeline(group, contract.schedule(), SamplerConfig(method="ddim", num_steps=1), attention=attention)
    with captured(ControlNetModel, UNet2DConditionModel, stub=UNET_STUB) as restore:
        text = jax.jit(pipe.encode_text)(variables, {"sd21": batch["input_ids"]})
        jax.block_until_ready(pipe(variables, jax.random.key(1), batch["degraded"], batch["pose"], text,
                                   mask=batch["mask"]))
    jax.effects_barrier()
    (z_train, _, context_train, cond_train), _ = train["ControlNetModel"]
    (z_restore, _, context_restore, cond_restore), _ = restore["ControlNetModel"]
    assert z_train.shape == z_restore.shape
    # [E(I_reg), E(pose), I_attn]: 4 + 4 + 1 channels
    assert cond_train.shape[-1] == 9
    np.testing.assert_allclose(np.asarray(cond_restore), np.asarray(cond_train), atol=ATOL)
    np.testing.assert_allclose(np.asarray(context_restore), np.asarray(context_train), atol=ATOL)

    # Eq. 4 recomputed in float64 from what the models saw: ||(1 + I_attn)(eps - eps_theta)||^2, mean over elements
    t = train["ControlNetModel"][0][1]
    a = _alphas_cumprod(contract)[t]
    x0 = np.asarray(images_to_latents(group.vae, variables["params"]["vae"], batch["target"]), np.float64)
    eps = _noise_of(z_train, x0, a)
    weight = (1.0 + np.asarray(cond_train, np.float64)[..., 8:9]) ** 2
    want = np.mean(weight * (eps - 0.5 * np.asarray(z_train, np.float64)) ** 2)
    assert abs(value - want) <= 1e-4 * want, (value, want)


@pytest.fixture(scope="module")
def stage1_world():
    group = build_model(load_config("stage1_controlnet:variant=tiny").model)
    stage2 = build_model(load_config("colour_adapter:variant=tiny").model)
    return group, _variables(group, 5), stage2, _variables(stage2, 7)


@pytest.mark.parametrize("normalize", [False, True])
def test_stage1_loss_and_pipeline_feed_the_joint_unet_alike(stage1_world, rng, normalize):
    from diffbody_jax.pipelines.v2 import V2Pipeline

    group, variables, stage2, variables2 = stage1_world
    config = load_config("stage1_controlnet:variant=tiny", [f"joint.normalize_latents={normalize}"])
    contract = contract_from_config(config)
    batch = _batch(rng)
    batch["depth"] = rng.uniform(0, 1, (2, 64, 64, 1)).astype(np.float32)
    batch["normal"] = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    branches = tuple(group.joint_unet.config.branches)
    alphas = jnp.asarray(contract.schedule().alphas_cumprod())
    with captured(ControlNetModel, JointUNet, stub=JOINT_STUB) as train:
        loss = jax.jit(lambda v, b, k: stage1_loss(group, v, b, k, alphas, branches=branches,
                                                   latent_stats=contract.stats()))
        value = float(loss(variables, batch, jax.random.key(0))[0])
    one_step = SamplerConfig(method="ddim", num_steps=1)
    pipe = V2Pipeline(group, stage2, contract.schedule(), contract.schedule(), one_step, one_step,
                      latent_stats=contract.stats())
    both = {"stage1": variables, "stage2": variables2}
    with captured(ControlNetModel, JointUNet, stub=JOINT_STUB) as restore:
        ids = {"sd21": batch["input_ids"], "sdxl": batch["input_ids"], "sdxl_2": batch["input_ids"]}
        context = jax.jit(pipe.encode_text, static_argnums=2)(both, ids, (64, 64))[0]
        jax.block_until_ready(jax.jit(pipe.run_stage1)(both, jax.random.key(1), batch["degraded"], batch["pose"],
                                                       context))
    jax.effects_barrier()
    (_, _, ctx_t, c_r_t), _ = train["ControlNetModel"]
    (_, _, ctx_r, c_r_r), _ = restore["ControlNetModel"]
    np.testing.assert_allclose(np.asarray(c_r_r), np.asarray(c_r_t), atol=ATOL)  # E(I_ir)
    np.testing.assert_allclose(np.asarray(ctx_r), np.asarray(ctx_t), atol=ATOL)
    (x_t, *_), _ = train["JointUNet"]
    (x_r, *_), _ = restore["JointUNet"]
    n = len(branches)
    pose_t = np.split(np.asarray(x_t), n, -1)  # each branch's [z_k, c_p]: the pose latent is channels 4:8
    pose_r = np.split(np.asarray(x_r), n, -1)
    for b in range(n):
        np.testing.assert_allclose(pose_r[b][..., 4:], pose_t[b][..., 4:], atol=ATOL)
    # independently: c_p is E(pose), moved to the RGB statistics by the paper's affine map in float64
    raw = np.asarray(images_to_latents(group.vae, variables["params"]["vae"], jnp.asarray(batch["pose"])),
                     np.float64)
    stats = config.joint.latent_stats  # the authors' numbers, as the config file gives them
    if normalize:
        (m, s), (m_rgb, s_rgb) = stats["pose"], stats["rgb"]
        raw = (raw - m) / s * s_rgb + m_rgb
    np.testing.assert_allclose(pose_r[0][..., 4:], raw, atol=1e-5)

    # Eq. 1 recomputed in float64: the sum over branches of each branch's mean squared error, each branch noised
    # with its own eps (one t per example)
    t = train["JointUNet"][0][1]
    a = _alphas_cumprod(contract)[t]
    want, noises = 0.0, []
    for b, name in enumerate(branches):
        image = {"rgb": batch["target"], "depth": np.repeat(batch["depth"], 3, -1), "normal": batch["normal"]}[name]
        x0 = np.asarray(images_to_latents(group.vae, variables["params"]["vae"], jnp.asarray(image)), np.float64)
        if normalize and name != "rgb":
            (m, s), (m_rgb, s_rgb) = stats[name], stats["rgb"]
            x0 = (x0 - m) / s * s_rgb + m_rgb
        z = np.asarray(pose_t[b][..., :4], np.float64)
        noises.append(_noise_of(z, x0, a))
        want += np.mean((noises[-1] - 0.5 * z) ** 2)
    assert abs(value - want) <= 1e-4 * want, (value, want)
    for b in range(1, n):  # independent noise per branch, not one shared draw
        assert abs(np.corrcoef(noises[0].ravel(), noises[b].ravel())[0, 1]) < 0.2


def test_stage2_loss_and_pipeline_feed_the_stage2_model_alike(stage1_world, rng):
    """The colour-adapter phase against stage 2 of the pipeline. By design the pipeline's adapter image is I_res and
    its priors come from stage 1, while training shows I_ir (config adapter.image) and the data's maps, and SDXL's
    time_ids of a training crop name the photo's size and the crop's place: here both sides get the same images
    (I_res := I_ir, stage 1's depth and normal := the batch's) and an uncropped photo of the bucket's size."""
    from diffbody_jax.models.stage2 import Stage2Model
    from diffbody_jax.pipelines.v2 import V2Pipeline
    from diffbody_jax.training.losses import regress, stage2_phase_loss

    group1, variables1, group2, variables2 = stage1_world
    config = load_config("colour_adapter:variant=tiny")
    contract = contract_from_config(config)
    b, size = 2, 64
    batch = _batch(rng, b, size)
    batch["input_ids"] = tokenize(load_tokenizer(None, "<|endoftext|>"), [PROMPT] * b)
    batch["input_ids_2"] = tokenize(load_tokenizer(None, "!"), [PROMPT] * b)
    batch["depth"] = rng.uniform(0, 1, (b, size, size, 1)).astype(np.float32)
    batch["normal"] = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
    batch["original_size"] = np.full((b, 2), size, np.int32)
    batch["crop_top_left"] = np.zeros((b, 2), np.int32)
    alphas = jnp.asarray(contract.schedule().alphas_cumprod())
    stub = {Stage2Model: lambda args: 0.5 * args[0]}
    with captured(Stage2Model, stub=stub) as train:
        loss = jax.jit(lambda v, bt, k: stage2_phase_loss(group2, v, bt, k, alphas, "colour_adapter",
                                                          adapter_image=contract.adapter["image"],
                                                          clip_fit=contract.clip_fit))
        value = float(loss(variables2, batch, jax.random.key(0))[0])
    one_step = SamplerConfig(method="ddim", num_steps=1)
    pipe = V2Pipeline(group1, group2, contract.schedule(), contract.schedule(), one_step, one_step,
                      clip_fit=contract.clip_fit)
    both = {"stage1": variables1, "stage2": variables2}
    i_ir = jax.jit(lambda v, x: regress(group2, v, x))(variables2, batch["degraded"])
    first = {"i_ir": i_ir, "i_res": i_ir, "depth": batch["depth"], "normal": batch["normal"]}
    with captured(Stage2Model, stub=stub) as restore:
        ids = {"sd21": batch["input_ids"], "sdxl": batch["input_ids"], "sdxl_2": batch["input_ids_2"]}
        _, text = jax.jit(pipe.encode_text, static_argnums=2)(both, ids, (size, size))
        jax.block_until_ready(jax.jit(pipe.run_stage2)(both, jax.random.key(1), first, batch["pose"], text))
    jax.effects_barrier()
    (_, _, text_t, priors_t, image_t), _ = train["Stage2Model"]
    (_, _, text_r, priors_r, image_r), _ = restore["Stage2Model"]
    for field in ("prompt_embeds", "text_embeds", "time_ids"):
        np.testing.assert_allclose(getattr(text_r, field), getattr(text_t, field), atol=ATOL, err_msg=field)
    np.testing.assert_array_equal(text_r.time_ids, np.tile(np.float32([[size, size, 0, 0, size, size]]), (b, 1)))
    assert sorted(priors_r) == sorted(priors_t) == ["depth", "ir", "normal", "pose"]
    for name in priors_t:
        np.testing.assert_allclose(priors_r[name], priors_t[name], atol=ATOL, err_msg=name)
    np.testing.assert_allclose(image_r, image_t, atol=ATOL)

    # Eq. 4 recomputed in float64: ||eps - eps_theta||^2 on SDXL's latents of the clean crop
    z, t = train["Stage2Model"][0][:2]
    a = _alphas_cumprod(contract)[t]
    x0 = np.asarray(images_to_latents(group2.vae, variables2["params"]["vae"], batch["target"]), np.float64)
    want = np.mean((_noise_of(z, x0, a) - 0.5 * np.asarray(z, np.float64)) ** 2)
    assert abs(value - want) <= 1e-4 * want, (value, want)
