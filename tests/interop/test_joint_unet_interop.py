"""JointUNet checkpoints: our diffusers-style folder, the import of a plain SD UNet folder, real-size coverage."""

import json

import jax
import numpy as np

import diffbody_jax
from diffbody_jax.interop.mapping import flatten_params
from diffbody_jax.interop.pretrained import init_from_pretrained_unet
from diffbody_jax.models.joint_unet import JointUNet, JointUNetConfig
from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.torch_ref import REPO, nchw_to_nhwc, needs_torch, optional, randomize_, unet_diffusers_config

torch = optional("torch")
diffusers = optional("diffusers")


@needs_torch
def test_plain_sd_unet_folder_imports_into_a_fresh_joint_unet(tmp_path, rng):
    ref = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sd21")).eval()
    randomize_(ref, 11)
    ref.save_pretrained(tmp_path / "sd-unet")
    joint = JointUNet(JointUNetConfig.from_unet(UNetConfig.from_dict(unet_diffusers_config("tiny-sd21")),
                                                copy_first_n_block=1, copy_last_n_block=2))
    params, copied, _ = init_from_pretrained_unet(tmp_path / "sd-unet", joint, jax.random.key(0))
    assert joint.config.unet.in_channels == 8 and joint.config.branches == ("rgb", "depth", "normal")
    assert "conv_in_branch_2/kernel" in copied and "up_blocks_branch_1_1/resnets_0/conv1/kernel" in copied

    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 24)).astype(np.float32)
    with torch.no_grad():
        want = nchw_to_nhwc(ref(torch.from_numpy(x), 500, torch.from_numpy(ctx)).sample.numpy())
    branch = np.concatenate([nchw_to_nhwc(x), rng.standard_normal((1, 8, 8, 4)).astype(np.float32)], -1)
    got = joint.apply({"params": params}, np.concatenate([branch] * 3, -1), 500, ctx)
    for b in range(3):
        assert np.abs(got[..., 4 * b: 4 * b + 4] - want).max() <= 1e-4


def test_saved_folder_reloads_bit_exactly(tmp_path):
    unet_cfg = UNetConfig.from_dict(unet_diffusers_config("tiny-sd21"))
    joint = JointUNet(JointUNetConfig.from_unet(unet_cfg, num_time_ids=6, addition_time_embed_dim=8,
                                                branches=("rgb", "depth"), copy_first_n_block=2))
    params = joint.init_params(jax.random.key(0))
    diffbody_jax.save_pretrained(tmp_path, joint, params)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "JointUNet" and saved["branches"] == ["rgb", "depth"]
    again, back = diffbody_jax.load_pretrained(tmp_path, param_dtype=None)
    assert again.config == joint.config
    for (pa, a), (pb, b) in zip(flatten_params(params).items(), flatten_params(back).items(), strict=True):
        assert pa == pb and np.asarray(a).tobytes() == np.asarray(b).tobytes(), pa


def _count(shapes, prefix=()):
    flat = flatten_params(shapes)
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if not prefix or k.startswith(prefix))


def test_sd21_base_size_builds_under_eval_shape():
    """926,301,775 params at (1, 1) (in the README): SD2.1-base plus two more copies of the per-branch parts."""
    config_json = REPO / "configs/diffusers/sd21-base/unet/config.json"
    unet_cfg = UNetConfig.from_dict(json.loads(config_json.read_text()))
    plain = UNet2DConditionModel(unet_cfg).param_shapes()
    joint = JointUNet(JointUNetConfig.from_unet(unet_cfg)).param_shapes()
    per_branch = _count(plain, ("conv_in/", "down_blocks_0/", "up_blocks_3/", "conv_norm_out/", "conv_out/"))
    widened = 3 * 4 * 320 * 9  # the pose latent's 4 input channels of every branch's conv_in
    assert _count(joint) == _count(plain) + 2 * per_branch + widened + 3 == 926_301_775
