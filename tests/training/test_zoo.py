"""The tiny zoo (training/zoo.py): phases chained through their exports, zoo.json, resuming phase by phase, and the
assembled weights folder."""

import json

import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.files import read_json
from diffbody_jax.pipelines.weights import check_weights
from diffbody_jax.training.zoo import ZOO, folder_hash, phase_overrides, train_zoo


def test_a_rerun_skips_the_phases_done_and_a_changed_config_is_refused(tmp_path):
    swinir = next(p for p in ZOO if p.name == "swinir")
    lines = []
    first = train_zoo(tmp_path, steps_scale=2 / swinir.steps, phases=(swinir,), progress=lines.append)
    record = read_json(tmp_path / "zoo.json")
    assert record["phases"]["swinir"]["steps"] == 2 and record["phases"]["swinir"]["final"]["loss"] > 0
    assert record["weights"]["swinir"] == folder_hash(first.weights / "swinir")
    assert set(record["stand_ins"]) == {"sd21/text_encoder", "sdxl/text_encoder", "sdxl/text_encoder_2",
                                        "image_encoder"}
    for component, stand_in in record["stand_ins"].items():  # the recorded seed rebuilds the same files
        assert folder_hash(first.weights / component) == stand_in["sha256"]
    lines.clear()
    train_zoo(tmp_path, steps_scale=2 / swinir.steps, phases=(swinir,), progress=lines.append)
    assert any("swinir: done (2 steps)" in line for line in lines), lines
    with pytest.raises(ValueError, match="steps_scale"):
        train_zoo(tmp_path, steps_scale=1.0, phases=(swinir,))


def test_every_phase_starts_from_the_exports_before_it(tmp_path):
    """The init sources name only runs that come earlier in ZOO (or the stand-ins), so one pass in order works."""
    seen = set()
    for phase in ZOO:
        for _, source in phase.init_from:
            kind, _, rest = source.removeprefix("unet:").partition(":")
            assert kind in ("run", "weights")
            if kind == "run":
                assert rest in seen, f"{phase.name} starts from {rest}, which has not run yet"
        if phase.vae_run is not None:
            assert phase.vae_run in seen
        seen.add(phase.name)
    vae_export = tmp_path / "runs" / "vae" / "export"
    vae_export.mkdir(parents=True)
    (vae_export / "config.json").write_text(json.dumps({"scaling_factor": 0.4321, "block_out_channels": [16, 32, 64],
                                                        "sample_size": 7}))
    v1 = next(p for p in ZOO if p.name == "v1_controlnet")
    overrides = phase_overrides(v1, tmp_path, {"people": tmp_path / "people.jsonl"}, 10, 7)
    vae = [o for o in overrides if o.startswith("model.members.vae.")]
    assert vae == ["model.members.vae.diffusers.block_out_channels=[16, 32, 64]",
                   "model.members.vae.diffusers.scaling_factor=0.4321"], vae
    manifests = {"people": tmp_path / "people.jsonl", "photos": tmp_path / "photos.jsonl"}
    for phase in ZOO:  # every override names a field of its config
        load_config(phase.config, phase_overrides(phase, tmp_path, manifests, 10, 7))
    init = next(o for o in overrides if o.startswith("train.init_from="))
    assert f"controlnet=unet:{tmp_path}/runs/unet_sd21/export" in init


@pytest.mark.slow
def test_a_shortened_zoo_trains_every_phase_and_its_weights_folder_is_complete(tmp_path):
    result = train_zoo(tmp_path, steps_scale=0.1)
    assert list(result.record["phases"]) == [p.name for p in ZOO]
    for name in result.record["phases"]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])  # single steps are noisy (random crops, noise)
        assert len(losses) >= 8 and last < first, f"{name}: loss {first} -> {last} ({losses})"
    reports, needs = check_weights(result.weights)
    assert needs == {version: [] for version in needs}, needs
    assert all(r.present and r.problem is None for r in reports), [r for r in reports if r.problem or not r.present]
