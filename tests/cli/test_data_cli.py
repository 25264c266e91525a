"""`python -m diffbody_jax.cli.data` and the SwinIR conversions of `python -m convert`."""

import json

import jax
import numpy as np
import pytest

from diffbody_jax.cli import data
from diffbody_jax.cli.convert import main as convert_main
from diffbody_jax.config import load_config
from diffbody_jax.interop.swinir import load_swinir, save_swinir
from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
from tests.torch_ref import REPO, bodypart_config


def test_sample_set_validate_preview(tmp_path, capsys):
    pytest.importorskip("skimage")
    assert data.main(["sample-set", "--out", str(tmp_path / "s")]) == 0
    manifest = tmp_path / "s" / "manifest.jsonl"
    assert data.main(["validate", str(manifest), "--require", "pose"]) == 0
    assert "4 examples, all valid" in capsys.readouterr().out
    spec = f"{REPO}/configs/degradation.py:kind=blur2-noise40-down4"
    assert data.main(["preview", str(manifest), "--out", str(tmp_path / "p.png"), "--degradation", spec,
                      "--buckets", "128"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    with open(manifest, "a") as f:
        f.write(json.dumps({"image": "images/none.png", "caption": "gone"}) + "\n")
    assert data.main(["validate", str(manifest)]) == 1
    assert "manifest.jsonl:5: image 'images/none.png': no such file" in capsys.readouterr().err


def test_swinir_conversion_round_trip(tmp_path):
    pytest.importorskip("torch")
    spec = f"{REPO}/configs/swinir.py:variant=tiny-diffbir"
    config = SwinIRConfig.from_dict(load_config(spec).model.swinir.to_dict())
    params = SwinIR(config).init_params(jax.random.key(0))
    save_swinir(tmp_path / "in.ckpt", config, params)
    assert convert_main(["swinir-to-flax", "--src", str(tmp_path / "in.ckpt"), "--config", spec,
                         "--dst", str(tmp_path / "ckpt")]) == 0
    assert convert_main(["swinir-to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out.pth")]) == 0
    jax.tree.map(np.testing.assert_array_equal, params, load_swinir(tmp_path / "out.pth", config))
    assert convert_main(["swinir-to-torch", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out.pth")]) != 0


@pytest.mark.slow  # ~45 s; the body-part import/export itself is tested in tests/models/test_bodypart.py
def test_bodypart_conversion_round_trip(tmp_path):
    """torchreid checkpoint -> orbax (head read from the file) -> torchreid checkpoint, bit-exact; and a
    checkpoint holding only ImageNet backbone weights."""
    pytest.importorskip("torch")
    from diffbody_jax.interop.bodypart import bodypart_state_dict, load_bodypart, save_bodypart
    from diffbody_jax.models.bodypart import BodyPartNet

    config = bodypart_config(num_identities=3, embed_dim=24)
    variables = BodyPartNet(config=config).init_variables(jax.random.key(0))
    save_bodypart(tmp_path / "in.pth.tar", variables)
    spec = f"{REPO}/configs/bodypart.py:variant=tiny"
    assert convert_main(["bodypart-to-flax", "--src", str(tmp_path / "in.pth.tar"), "--config", spec,
                         "--dst", str(tmp_path / "ckpt")]) == 0
    assert convert_main(["bodypart-to-torch", "--src", str(tmp_path / "ckpt"),
                         "--dst", str(tmp_path / "out.pth.tar")]) == 0
    got_config, got = load_bodypart(tmp_path / "out.pth.tar", config)
    jax.tree.map(np.testing.assert_array_equal, variables, got)
    backbone = {k[len("backbone_appearance_feature_extractor."):]: v for k, v in bodypart_state_dict(variables).items()
                if k.startswith("backbone_appearance_feature_extractor.") and ".cls_head." not in k}
    save_file = tmp_path / "imagenet.safetensors"
    from diffbody_jax.interop.torch_files import write_safetensors

    write_safetensors(backbone, save_file)
    assert convert_main(["bodypart-to-flax", "--imagenet", str(save_file), "--config", spec,
                         "--dst", str(tmp_path / "init")]) == 0
    assert convert_main(["bodypart-to-flax", "--config", spec, "--dst", str(tmp_path / "none")]) != 0
