"""The tiny zoo (training/zoo.py): phases chained through their exports, zoo.json, resuming phase by phase, and the
assembled weights folder."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from diffbody_jax.config import load_config
from diffbody_jax.files import read_json
from diffbody_jax.pipelines.weights import check_weights
from diffbody_jax.training.zoo import ZOO, budget_minutes, folder_hash, phase_overrides, train_zoo


def test_a_rerun_skips_what_is_done_continues_what_grew_and_restarts_what_lost_its_inputs(tmp_path):
    swinir = next(p for p in ZOO if p.name == "swinir")
    after = dataclasses.replace(swinir, name="swinir_after", components=(), init_from=(("", "run:swinir"),))
    phases, lines = (swinir, after), []
    first = train_zoo(tmp_path, steps_scale=2 / swinir.steps, phases=phases, progress=lines.append)
    record = read_json(tmp_path / "zoo.json")
    assert record["phases"]["swinir"]["steps"] == 2 and record["phases"]["swinir"]["final"]["loss"] > 0
    assert record["weights"]["swinir"] == folder_hash(first.weights / "swinir")
    assert record["phases"]["swinir_after"]["inputs"] == {"runs/swinir/export": folder_hash(first.weights / "swinir")}
    assert record["phases"]["swinir"]["code"]["commit"] == record["code"]["commit"]
    assert set(record["stand_ins"]) == {"sd21/text_encoder", "sdxl/text_encoder", "sdxl/text_encoder_2",
                                        "image_encoder"}
    for component, stand_in in record["stand_ins"].items():  # the recorded seed rebuilds the same files
        assert folder_hash(first.weights / component) == stand_in["sha256"]
    lines.clear()
    train_zoo(tmp_path, steps_scale=2 / swinir.steps, phases=phases, progress=lines.append)
    assert any("swinir: done (2 steps)" in line for line in lines), lines
    assert any("swinir_after: done (2 steps)" in line for line in lines), lines
    # a bigger budget: the first phase continues its run; the next one's input changed, so it starts afresh
    lines.clear()
    train_zoo(tmp_path, steps_scale=3 / swinir.steps, phases=phases, progress=lines.append)
    record = read_json(tmp_path / "zoo.json")
    assert record["phases"]["swinir"]["steps"] == 3 and record["phases"]["swinir_after"]["steps"] == 3
    assert not (tmp_path / "runs" / "swinir.replaced-1").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "swinir" / "metrics.jsonl").open()]
    assert steps == sorted(steps) and steps[-1] == 3, steps  # one run, continued from its step-2 checkpoint
    assert (tmp_path / "runs" / "swinir_after.replaced-1" / "export").is_dir(), lines
    assert any("swinir_after's inputs changed" in line for line in lines), lines
    assert record["phases"]["swinir_after"]["inputs"] == {
        "runs/swinir/export": folder_hash(tmp_path / "runs" / "swinir" / "export")}
    with pytest.raises(ValueError, match="seed 0 is there"):
        train_zoo(tmp_path, seed=1, phases=phases)
    with pytest.raises(ValueError, match="budget 'long'"):
        train_zoo(tmp_path, budget="long", phases=phases)


def test_the_budgets_estimates_follow_the_measured_step_times():
    quick, full = budget_minutes("quick"), budget_minutes("full")
    assert 30 < quick <= 45 < full, (quick, full)  # the quick zoo fits the 45 minutes issue 31 allows
    assert all(p.full_steps >= p.steps for p in ZOO)


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
    swinir_export = tmp_path / "runs" / "swinir" / "export"
    swinir_export.mkdir(parents=True)
    (swinir_export / "config.json").write_text(json.dumps({"_class_name": "SwinIR", "embed_dim": 40, "depths": [2, 2]}))
    v1 = next(p for p in ZOO if p.name == "v1_controlnet")
    overrides = phase_overrides(v1, tmp_path, {"photos": tmp_path / "photos.jsonl"}, 10, 7)
    vae = [o for o in overrides if o.startswith("model.members.vae.")]
    assert vae == ["model.members.vae.diffusers.block_out_channels=[16, 32, 64]",
                   "model.members.vae.diffusers.scaling_factor=0.4321"], vae
    assert [o for o in overrides if o.startswith("model.members.swinir.")] == [
        "model.members.swinir.swinir.embed_dim=40"]  # the fields that differ from the member's config
    manifests = {"people": tmp_path / "people.jsonl", "photos": tmp_path / "photos.jsonl"}
    predicts = {}
    for phase in ZOO:  # every override names a field of its config
        config = load_config(phase.config, phase_overrides(phase, tmp_path, manifests, 10, 7))
        if "swinir" in dict(phase.init_from):
            assert config.model.members.swinir.swinir.embed_dim == 40, phase.name
        if "diffusion" in config and "prediction_type" in config.diffusion:
            predicts[phase.name] = config.diffusion.prediction_type
    # a ControlNet or joint UNet predicts what the base UNet it starts from and steers predicts: all v in the zoo
    assert len(predicts) == 7 and set(predicts.values()) == {"v_prediction"}, predicts
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


def test_a_packed_zoo_is_half_precision_checked_and_unpacks_to_a_full_weights_folder(tmp_path):
    from diffbody_jax.interop.torch_files import read_state_dict
    from diffbody_jax.models.swinir import SwinIR, SwinIRConfig
    from diffbody_jax.pipelines.weights import load_component, write_component
    from diffbody_jax.training.zoo import pack_zoo, unpack_zoo, write_stand_ins

    zoo = tmp_path / "zoo"
    config = SwinIRConfig.from_dict(load_config("swinir:variant=tiny-diffbir").model.swinir.to_dict())
    trained = SwinIR(config).init_params(jax.random.key(0))
    write_component(zoo / "weights", "swinir", SwinIR(config), {"params": trained})
    (zoo / "data" / "held_out").mkdir(parents=True)
    (zoo / "data" / "held_out" / "a.png").write_bytes(b"png")
    (zoo / "data" / "held_out.jsonl").write_text('{"image": "held_out/a.png"}\n')
    stand_ins = write_stand_ins(zoo / "weights", seed=0)
    (zoo / "zoo.json").write_text(json.dumps({"seed": 0, "stand_ins": stand_ins,
                                              "weights": {"swinir": folder_hash(zoo / "weights" / "swinir")}}))
    (zoo / "code-swinir.diff").write_text("diff --git a/x b/x\n")  # a dirty tree's changes ship with the zoo
    record = pack_zoo(zoo, tmp_path / "shipped")
    assert (tmp_path / "shipped" / "code-swinir.diff").read_text() == "diff --git a/x b/x\n"
    packed = tmp_path / "shipped" / "weights" / "swinir"
    assert {str(v.dtype) for v in read_state_dict(packed / "model.safetensors").values()} == {"float16"}
    assert sorted(p.name for p in (tmp_path / "shipped" / "weights").iterdir()) == ["swinir"]  # no stand-ins
    assert record["shipped"]["weights"]["swinir"] == folder_hash(packed)

    weights = unpack_zoo(tmp_path / "shipped", tmp_path / "unpacked")
    assert weights == tmp_path / "unpacked" / "weights"
    assert (tmp_path / "unpacked" / "data" / "held_out" / "a.png").read_bytes() == b"png"
    assert read_json(tmp_path / "unpacked" / "zoo.json") == record
    for component, stand_in in stand_ins.items():  # rebuilt from the seed, bit for bit
        assert folder_hash(weights / component) == stand_in["sha256"]
    _, variables = load_component(weights, "swinir")
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(trained), strict=True):
        np.testing.assert_allclose(a, np.asarray(b, np.float16).astype(np.float32), rtol=0, atol=0)

    (packed / "model.safetensors").write_bytes((packed / "model.safetensors").read_bytes()[:-2] + b"\0\0")
    with pytest.raises(ValueError, match="swinir: missing or not the files"):
        unpack_zoo(tmp_path / "shipped", tmp_path / "again")
    with pytest.raises(ValueError, match="not finished"):
        (zoo / "zoo.json").write_text(json.dumps({"seed": 0}))
        pack_zoo(zoo, tmp_path / "again")
