"""`python -m convert` on whole folders: pipeline and model layouts, round trip, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import diffbody_jax
from diffbody_jax.cli.convert import main
from tests.torch_ref import (
    REPO,
    randomize_,
    resampler_config,
    state_dict_numpy,
    unet_diffusers_config,
    vae_diffusers_config,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline folder: a tiny UNet and VAE, and a component we do not convert."""
    root = tmp_path_factory.mktemp("pipe")
    unet = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sdxl")).eval()
    randomize_(unet, seed=11)
    unet.save_pretrained(root / "unet")
    vae = diffusers.AutoencoderKL(**vae_diffusers_config("tiny")).eval()
    randomize_(vae, seed=12)
    vae.save_pretrained(root / "vae")
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=62, eos_token_id=63)).eval()
    randomize_(te, seed=13)
    te.save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    others = {**state_dict_numpy(vae), **{"te." + k: v for k, v in state_dict_numpy(te).items()}}
    return root, state_dict_numpy(unet), others


def _assert_same(folder, sd):
    back = diffusers.UNet2DConditionModel.from_pretrained(folder).state_dict()
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].numpy().tobytes() == value.tobytes(), key


def test_pipeline_round_trip(pipeline, tmp_path, capsys):
    root, sd, others = pipeline
    assert main(["to-flax", "--src", str(root), "--dst", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "skipped scheduler (DDIMScheduler: not supported yet)" in out
    assert main(["to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "back")]) == 0
    _assert_same(tmp_path / "back" / "unet", sd)
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back" / "vae").state_dict()
    te = transformers.CLIPTextModel.from_pretrained(tmp_path / "back" / "text_encoder").state_dict()
    for key, value in others.items():
        back = te[key[3:]] if key.startswith("te.") else vae[key]
        assert back.numpy().tobytes() == value.tobytes(), key
    # our checkpoint loads in one line too
    module, params = diffbody_jax.load_pretrained(tmp_path / "ckpt", subfolder="unet")
    assert module.config.addition_embed_type == "text_time"


def test_model_folder_round_trip_as_module_entry_point(pipeline, tmp_path):
    root, sd, others = pipeline
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for cmd in (["to-flax", "--src", str(root / "unet"), "--dst", str(tmp_path / "ckpt"), "--param-dtype", "keep"],
                ["to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "back")]):
        run = subprocess.run([sys.executable, "-m", "convert", *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    _assert_same(tmp_path / "back", sd)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["_diffusers_version"]


def test_bfloat16_storage(pipeline, tmp_path):
    root, sd, others = pipeline
    args = ["to-flax", "--src", str(root / "unet"), "--dst", str(tmp_path / "ckpt"), "--param-dtype", "bfloat16"]
    assert main(args) == 0
    _, params = diffbody_jax.load_pretrained(tmp_path / "ckpt", param_dtype=None)
    kernel = params["conv_in"]["kernel"]
    assert kernel.dtype.name == "bfloat16"
    np.testing.assert_allclose(kernel.astype(np.float32), sd["conv_in.weight"].transpose(2, 3, 1, 0), rtol=1e-2)


def test_errors_are_reported_not_raised(pipeline, tmp_path, capsys):
    root, _, _ = pipeline
    assert main(["to-flax", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["to-flax", "--src", str(root), "--dst", str(tmp_path / "ckpt")]) == 0
    assert main(["to-flax", "--src", str(root), "--dst", str(tmp_path / "ckpt")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["to-flax", "--src", str(root), "--dst", str(tmp_path / "ckpt"), "--overwrite"]) == 0


def test_init_from_unet_writes_joint_unet_and_controlnet(tmp_path, capsys):
    unet = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sd21")).eval()
    randomize_(unet, seed=14)
    unet.save_pretrained(tmp_path / "sd" / "unet")  # a pipeline folder holding the UNet
    sd = state_dict_numpy(unet)

    joint_cfg = f"{REPO}/configs/joint_unet.py:variant=tiny,copy_first=2"
    assert main(["init-from-unet", "--unet", str(tmp_path / "sd"), "--config", joint_cfg,
                 "--dst", str(tmp_path / "joint")]) == 0
    assert "copied" in capsys.readouterr().out
    joint, params = diffbody_jax.load_pretrained(tmp_path / "joint", param_dtype=None)
    assert type(joint).__name__ == "JointUNet" and joint.config.copy_first_n_block == 2
    np.testing.assert_array_equal(params["down_blocks_branch_2_1"]["resnets_0"]["conv1"]["kernel"],
                                  sd["down_blocks.1.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))

    cn_cfg = f"{REPO}/configs/controlnet.py:variant=tiny-v1"
    assert main(["init-from-unet", "--unet", str(tmp_path / "sd" / "unet"), "--config", cn_cfg,
                 "--dst", str(tmp_path / "cn"), "--format", "torch"]) == 0
    saved = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert saved["_class_name"] == "ControlNetModel" and saved["conditioning_embedding_type"] == "latent"
    cn, cn_params = diffbody_jax.load_pretrained(tmp_path / "cn")
    assert not np.asarray(cn_params["controlnet_mid_block"]["kernel"]).any()
    np.testing.assert_array_equal(cn_params["mid_block"]["resnets_1"]["norm2"]["scale"],
                                  sd["mid_block.resnets.1.norm2.weight"])

    bad = f"{REPO}/configs/unet.py:variant=tiny-sd21"
    assert main(["init-from-unet", "--unet", str(tmp_path / "sd"), "--config", bad, "--dst", str(tmp_path / "x")]) == 2
    assert "model.name='unet'; init-from-unet builds a joint_unet or a controlnet" in capsys.readouterr().err


def test_stage1_controlnet_starts_from_a_trained_joint_unet(tmp_path, capsys, rng):
    """init-from-unet with a JointUNet folder: the ControlNet gets the chosen branch's conv_in (all 8 inputs,
    pose channels included) and first down blocks, and the shared trunk, not a plain SD UNet's weights."""
    import jax

    from diffbody_jax.interop.pretrained import save_pretrained

    unet = diffusers.UNet2DConditionModel(**unet_diffusers_config("tiny-sd21")).eval()
    unet.save_pretrained(tmp_path / "sd")
    assert main(["init-from-unet", "--unet", str(tmp_path / "sd"), "--config",
                 f"{REPO}/configs/joint_unet.py:variant=tiny", "--dst", str(tmp_path / "joint0")]) == 0
    joint, params = diffbody_jax.load_pretrained(tmp_path / "joint0")
    # "train" it: every tensor moves, so each branch differs from the others and from the SD UNet
    params = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(np.shape(x)).astype(np.float32), params)
    save_pretrained(tmp_path / "joint", joint, params)
    cfg = f"{REPO}/configs/controlnet.py:variant=tiny-v2-stage1"
    for branch, b in (("rgb", 0), ("depth", 1)):
        assert main(["init-from-unet", "--unet", str(tmp_path / "joint"), "--config", cfg, "--branch", branch,
                     "--dst", str(tmp_path / f"cn-{branch}")]) == 0
        assert f"JointUNet branch '{branch}'" in capsys.readouterr().out
        _, cn = diffbody_jax.load_pretrained(tmp_path / f"cn-{branch}")
        kernel = np.asarray(cn["conv_in"]["kernel"])
        assert kernel.shape[2] == 8 and np.abs(kernel[:, :, 4:]).min() > 0  # pose inputs copied, not zero
        np.testing.assert_array_equal(kernel, params[f"conv_in_branch_{b}"]["kernel"])
        np.testing.assert_array_equal(cn["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
                                      params[f"down_blocks_branch_{b}_0"]["resnets_0"]["conv1"]["kernel"])
        np.testing.assert_array_equal(cn["down_blocks_1"]["resnets_0"]["conv1"]["kernel"],
                                      params["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])
        np.testing.assert_array_equal(cn["mid_block"]["resnets_0"]["norm1"]["scale"],
                                      params["mid_block"]["resnets_0"]["norm1"]["scale"])
        np.testing.assert_array_equal(cn["time_embedding"]["linear_1"]["kernel"],
                                      params["time_embedding"]["linear_1"]["kernel"])
    assert main(["init-from-unet", "--unet", str(tmp_path / "joint"), "--config", cfg, "--branch", "albedo",
                 "--dst", str(tmp_path / "x")]) == 2
    assert "no branch 'albedo'" in capsys.readouterr().err


def test_joint_unet_and_stage1_controlnet_configs_share_a_base():
    """Seed 002 Sec. 4.2: stage 1 is built on SD2.1-base; the authors' 768-v stays a variant of both."""
    from diffbody_jax.config import load_config

    assert load_config(f"{REPO}/configs/joint_unet.py").model.unet_variant == "sd21-base"
    for joint_variant, cn_variant in (("sd21-base", "diffbody-v2-stage1"), ("sd21-768v", "diffbody-v2-stage1-768v"),
                                      ("tiny", "tiny-v2-stage1")):
        joint = load_config(f"{REPO}/configs/joint_unet.py:variant={joint_variant}").model.config
        cn = load_config(f"{REPO}/configs/controlnet.py:variant={cn_variant}").model.diffusers
        base = json.loads((REPO / f"configs/diffusers/{joint_variant}/unet/config.json").read_text()) \
            if joint_variant != "tiny" else unet_diffusers_config("tiny-sd21")
        for field in ("block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types"):
            assert list(np.ravel(joint[field])) == list(np.ravel(cn[field])) == list(np.ravel(base[field])), field
        assert joint["in_channels"] == cn["in_channels"] == 8


def test_init_from_controlnet_and_ip_adapter_round_trip(tmp_path, capsys):
    """The stage-2 ControlNet from a diffusers ControlNet folder; an IP-Adapter-Plus .bin to orbax and back."""
    import torch

    from diffbody_jax.interop.ip_adapter import original_state_dict, write_ip_adapter
    from diffbody_jax.models.controlnet import ControlNetModel
    from diffbody_jax.models.ip_adapter import Resampler
    from diffbody_jax.models.unet import UNet2DConditionModel, UNetConfig
    from tests.torch_ref import controlnet_diffusers_config, torch_controlnet

    torch_controlnet(controlnet_diffusers_config("tiny-sdxl"), seed=1).save_pretrained(tmp_path / "cn")
    cfg = f"{REPO}/configs/controlnet.py:variant=tiny-v2-stage2"
    assert main(["init-from-controlnet", "--controlnet", str(tmp_path / "cn"), "--config", cfg,
                 "--dst", str(tmp_path / "stage2")]) == 0
    assert "copy of its conditioning embedding" in capsys.readouterr().out
    module, params = diffbody_jax.load_pretrained(tmp_path / "stage2")
    assert isinstance(module, ControlNetModel) and module.config.conditioning_embedding_type == "prior_fusion"
    assert module.fusion_alphas(params) == pytest.approx({"ir": 0.25, "pose": 0.25, "depth": 0.25, "normal": 0.25})

    unet_cfg = UNetConfig.from_dict(unet_diffusers_config("tiny-sdxl"))
    import jax

    adapter = {"image_proj": Resampler(resampler_config()).init_params(jax.random.key(0)),
               "ip_adapter": {}}
    from diffbody_jax.models.ip_adapter import ip_adapter_of

    adapter["ip_adapter"] = ip_adapter_of(UNet2DConditionModel(unet_cfg, ip_adapter=True).init_params(
        jax.random.key(1)))
    flat = original_state_dict(jax.tree.map(np.asarray, adapter), unet_cfg)
    write_ip_adapter(tmp_path / "ip.bin", flat)
    unet_spec = f"{REPO}/configs/unet.py:variant=tiny-sdxl"
    assert main(["ip-adapter-to-flax", "--src", str(tmp_path / "ip.bin"), "--unet-config", unet_spec,
                 "--dst", str(tmp_path / "ca")]) == 0
    assert main(["ip-adapter-to-torch", "--src", str(tmp_path / "ca"), "--dst", str(tmp_path / "back.bin")]) == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert set(back) == {"image_proj", "ip_adapter"}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        np.testing.assert_array_equal(back[part][rest].numpy(), value)
    assert main(["ip-adapter-to-flax", "--src", str(tmp_path / "cn" / "config.json"), "--unet-config", unet_spec,
                 "--dst", str(tmp_path / "bad")]) == 2
