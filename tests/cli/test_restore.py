"""`diffbody restore` and `diffbody weights check` on the tiny stand-in weights: every bad input gets one line
naming its file and problem while the good inputs of the same run are restored (exit 1); existing outputs are not
overwritten without --overwrite; a missing or misshapen component is named."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.cli.main import main


@pytest.fixture
def weights(stand_in_weights):
    return stand_in_weights


def _photo(rng, h=72, w=64):  # every good photo falls in the 64 x 64 bucket: one compile
    return (rng.uniform(0, 1, (h, w, 3)) * 255).astype(np.uint8)


def _inputs(folder, rng):
    folder.mkdir()
    good = {"rgb.png", "grey.png", "rgba.png", "cmyk.jpg", "deep.png"}
    Image.fromarray(_photo(rng)).save(folder / "rgb.png")
    Image.fromarray(_photo(rng)[..., 0]).save(folder / "grey.png")
    rgba = np.concatenate([_photo(rng), np.full((72, 64, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(_photo(rng)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.uniform(0, 1, (72, 72)) * 65535).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(_photo(rng)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:300])  # truncated
    (folder / "notes.png").write_text("not an image")
    Image.fromarray(_photo(rng, 32, 32)).save(folder / "small.png")
    return good


def test_bad_inputs_are_named_and_the_good_ones_restored(weights, tmp_path, rng, capsys):
    good = _inputs(tmp_path / "in", rng)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "rgb.png").write_bytes(b"earlier result")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"grey.png": "a grey photo"}))
    rc = main(["restore", str(tmp_path / "in"), str(tmp_path / "empty"), "--out", str(out), "--weights",
               str(weights), "--steps", "1", "--size", "64", "--batch", "1", "--prompts", str(prompts),
               "--save-intermediates", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    problems = {line for line in err.splitlines() if line.startswith("skipped: ")}
    for name, problem in (("cut.png", "truncated"), ("notes.png", "not an image"), ("small.png", "below the minimum"),
                          ("rgb.png", "exists (pass --overwrite"), ("empty", "no images")):
        assert sum(name in p and problem in p for p in problems) == 1, (name, problems)
    assert len(problems) == 5
    assert (out / "rgb.png").read_bytes() == b"earlier result"  # nothing overwritten
    restored = good - {"rgb.png"}
    for name in restored:
        stem = name.rsplit(".", 1)[0]
        image = Image.open(out / f"{stem}.png")
        original = Image.open(tmp_path / "in" / name)
        assert image.size == original.size, name
        assert (out / "compare" / f"{stem}.png").is_file()
        assert (out / "intermediates" / f"{stem}_i_reg.png").is_file()
    assert Image.open(out / "rgba.png").mode == "RGBA"  # alpha put back
    assert "16-bit" in err and "CMYK" in err and "grayscale" in err  # conversions are noted

    # asked to, it overwrites; a run with only good inputs exits 0
    rc = main(["restore", str(tmp_path / "in" / "rgb.png"), "--out", str(out), "--weights", str(weights),
               "--steps", "1", "--size", "64", "--overwrite", "--quiet"])
    assert rc == 0 and (out / "rgb.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_check_names_missing_and_misshapen_components(weights, tmp_path, capsys):
    assert main(["weights", "check", str(weights)]) == 0
    report = capsys.readouterr().out
    assert "v1: ready" in report and "v2: ready" in report
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    shutil.rmtree(broken / "joint_unet")
    config = json.loads((broken / "v1_controlnet" / "config.json").read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    (broken / "v1_controlnet" / "config.json").write_text(json.dumps(config))
    assert main(["weights", "check", str(broken)]) == 1
    report = capsys.readouterr().out
    assert "joint_unet             missing" in report
    line = next(x for x in report.splitlines() if x.startswith("v1_controlnet"))
    assert "BROKEN" in line and str(broken / "v1_controlnet") in line
    assert "v1: needs v1_controlnet" in report and "v2: needs joint_unet" in report

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    assert main(["restore", str(image), "--out", str(tmp_path / "o"), "--weights", str(broken), "--version", "v2",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "v2 needs 1 more component" in err and str(broken / "joint_unet") in err


def test_plan_prints_each_devices_memory_without_weights(tmp_path, capsys):
    """`diffbody restore --plan HxW` compiles for configs' shapes (no --weights, no inputs) and prints the memory;
    a bad size and a missing input are named; --fit tile plans the tiled program."""
    assert main(["restore", "--plan", "64x128", "--plan-variant", "tiny", "--steps", "1", "--dtype", "bfloat16",
                 "--fit", "tile", "--size", "64", "--compilation-cache", "off"]) == 0
    out = capsys.readouterr().out
    assert "plan: v1 64x128 on tiles of 64 bfloat16, batch 1 on 1 cpu device(s), params replicated" in out
    assert "attention bounded, tiny configs" in out and "per device: arguments" in out and "total" in out
    assert main(["restore", "--plan", "100x64", "--plan-variant", "tiny"]) == 1
    assert "--plan '100x64': expected HxW, multiples of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "inputs, --weights required (or --plan HxW)" in capsys.readouterr().err


def test_the_step_bar_is_hooked_into_the_sampler_only_when_asked_for():
    """Without --step-progress the Restorer gets no on_step hook (a host callback would keep its program out of the
    compilation cache); with it, the hook drives the steps bar, reset at each stage's first step."""
    from diffbody_jax.cli.restore import ProgressBars

    assert ProgressBars(1, 3, enabled=True).hook is None
    assert ProgressBars(1, 3, enabled=False, steps_enabled=True).hook is None
    bars = ProgressBars(1, 3, enabled=True, steps_enabled=True)
    for stage, index in ((1, 0), (1, 1), (1, 2), (2, 0)):
        bars.hook(stage, index)
    assert bars.steps.n == 1 and bars.steps.desc.startswith("stage 2 steps")
    bars.close()
