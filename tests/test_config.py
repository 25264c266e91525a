"""Config files: found by name from any directory, overrides, one builder per `model.name`."""

import os

import pytest

from diffbody_jax.config import CONFIG_DIR, apply_overrides, load_config
from diffbody_jax.models.registry import BUILDERS, build_model

SPECS = ["unet:variant=tiny-sd21", "controlnet:variant=tiny-v1", "joint_unet:variant=tiny", "stage2:variant=tiny",
         "swinir:variant=tiny", "vae:variant=tiny", "bodypart:variant=tiny"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_names_its_builder(spec):
    model = load_config(spec).model
    assert model.name in BUILDERS
    module = build_model(model)
    assert type(module).__name__ == {"unet": "UNet2DConditionModel", "controlnet": "ControlNetModel",
                                     "joint_unet": "JointUNet", "stage2": "Stage2Model", "swinir": "SwinIR",
                                     "vae": "AutoencoderKL", "bodypart": "BodyPartNet"}[model.name]


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("configs")
    by_name = load_config("unet:variant=tiny-sd21")
    by_path = load_config(f"{CONFIG_DIR}/unet.py:variant=tiny-sd21")
    assert by_name == by_path == load_config("configs/unet.py:variant=tiny-sd21")
    with pytest.raises(FileNotFoundError, match="config file nothere not found"):
        load_config("nothere")


def test_overrides_set_fields_and_name_bad_ones():
    config = load_config("unet:variant=tiny-sd21", overrides=["--config.model.dtype=bfloat16", "model.remat=dots"])
    assert config.model.dtype == "bfloat16" and config.model.remat == "dots"
    with pytest.raises(ValueError, match="no field 'dtyp'"):
        apply_overrides(config, ["model.dtyp=float32"])
    with pytest.raises(ValueError, match="model.remat"):
        apply_overrides(config, ["model.remat=[1]"])


def test_paper_variants_scan_sdxls_stacks_and_tiny_ones_keep_them_unrolled():
    from diffbody_jax.models.registry import build_model
    from diffbody_jax.models.stacked_blocks import scans_layers

    paper = load_config("stage2_controlnet:variant=paper").model.members
    assert paper.stage2.scan_layers and paper.stage2.remat == "full"
    assert not any(section.get("scan_layers") for name, section in paper.items() if name != "stage2")
    assert scans_layers(build_model(paper.stage2))
    tiny = load_config("stage2_controlnet:variant=tiny").model.members
    assert not tiny.stage2.scan_layers and not scans_layers(build_model(tiny.stage2))
