"""`diffbody demo` end to end: the fast variant (10 SwinIR steps, 2 sampling steps) in the default suite, the full
one (the papers' presets) marked slow. Both must write every file the demo promises."""

import json

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.cli.demo import main as demo
from diffbody_jax.cli.main import main

NAMES = ("astronaut", "astronaut_portrait", "cameraman", "cameraman_landscape")


def _check_outputs(out, capsys):
    printed = capsys.readouterr().out
    assert "Trained here: SwinIR only" in printed and "Random (tiny stand-ins)" in printed
    assert "diffbody convert to-flax" in printed and "diffbody restore" in printed
    sheet = np.asarray(Image.open(out / "sheet.png"))
    assert sheet.shape[0] > sheet.shape[1] * 0.6 and sheet.std() > 0  # 4 rows x 5 columns, not blank
    for version, extra in (("v1", ("i_reg", "attention")), ("v2", ("i_ir", "i_res", "depth", "normal"))):
        for name in NAMES:
            assert Image.open(out / version / f"{name}.png").size == Image.open(out / "degraded" / f"{name}.png").size
            assert (out / version / "compare" / f"{name}.png").is_file()
            for what in extra:
                assert (out / version / "intermediates" / f"{name}_{what}.png").is_file()
    timing = (out / "timing.md").read_text()
    for stage in ("train SwinIR", "restore v1", "restore v2", "total"):
        assert stage in timing
    assert main(["weights", "check", str(out / "weights"), "--configs-only"]) == 0
    return json.loads((out / "summary.json").read_text())


def test_fast_demo_writes_everything_it_promises(tmp_path, capsys):
    assert demo(["--out", str(tmp_path / "demo"), "--fast", "--stand-ins"]) == 0
    summary = _check_outputs(tmp_path / "demo", capsys)
    assert summary["sampling_steps"] == {"v1": 2, "v2": 2} and summary["train_steps"] == 10
    # a second run replaces a demo folder; a foreign folder is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert demo(["--out", str(tmp_path / "mine"), "--fast", "--stand-ins"]) == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    with pytest.raises(SystemExit):  # refused before any folder is touched
        demo(["--out", str(tmp_path / "other"), "--stand-ins", "--zoo", str(tmp_path / "zoo")])
    assert not (tmp_path / "other").exists()


@pytest.mark.slow  # ~2.5 minutes: 400 SwinIR steps, DDPM 50 (v1) and 2 x 200 (v2) steps
def test_full_demo_trains_swinir_past_the_degraded_inputs(tmp_path, capsys):
    assert demo(["--out", str(tmp_path / "demo"), "--stand-ins"]) == 0
    summary = _check_outputs(tmp_path / "demo", capsys)
    assert summary["sampling_steps"] == {"v1": 50, "v2": 200}
    assert summary["swinir_psnr_restored"] > summary["swinir_psnr_degraded"] + 1.0


def test_zoo_demo_restores_and_scores_the_held_out_photos(tmp_path, rng, capsys):
    """--zoo with a packed zoo, as the repository ships one (random stand-in weights here: the mechanics, not the
    quality, which docs/zoo.md measures): it is unpacked into OUT, checked, and every promised file is written, with
    metrics.json's PSNR the written PNGs'."""
    from diffbody_jax.pipelines.stand_in import write_stand_in_weights
    from diffbody_jax.training.zoo import ZOO, folder_hash, pack_zoo, train_zoo, write_stand_ins

    zoo = tmp_path / "zoo"
    assert demo(["--out", str(tmp_path / "none"), "--zoo", str(zoo), "--fast"]) == 1
    assert "is not a trained zoo" in capsys.readouterr().err
    write_stand_in_weights(zoo / "weights", seed=0)
    stand_ins = write_stand_ins(zoo / "weights", seed=0)
    (zoo / "data" / "held_out").mkdir(parents=True)
    smooth = np.kron(rng.uniform(0, 1, (12, 10, 3)), np.ones((16, 16, 1)))
    Image.fromarray((smooth * 255).astype(np.uint8)).save(zoo / "data" / "held_out" / "portrait.png")
    keypoints = np.zeros((17, 3))
    keypoints[:, :2] = rng.uniform(40, 150, (17, 2))
    keypoints[:, 2] = 1.0
    (zoo / "data" / "held_out.jsonl").write_text(json.dumps({
        "image": "held_out/portrait.png", "caption": "a person", "keypoints": keypoints.tolist(),
        "keypoint_format": "coco17"}))
    trained = [c for phase in ZOO for c in phase.components]
    (zoo / "zoo.json").write_text(json.dumps({"seed": 0, "stand_ins": stand_ins, "weights": {
        c: folder_hash(zoo / "weights" / c) for c in trained}}))
    pack_zoo(zoo, tmp_path / "shipped")
    with pytest.raises(ValueError, match="a packed zoo"):
        train_zoo(tmp_path / "shipped")
    out = tmp_path / "demo"
    assert demo(["--out", str(out), "--zoo", str(tmp_path / "shipped"), "--fast"]) == 0
    printed = capsys.readouterr().out
    assert main(["weights", "check", str(out / "weights"), "--configs-only"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out"] == ["portrait"] and metrics["sampling_steps"] == {"v1": 2, "v2": 2}
    assert metrics["zoo"] == str(tmp_path / "shipped")
    clean = np.asarray(Image.open(out / "clean" / "portrait.png"), np.float64)
    assert clean.shape == (64, 64, 3)
    for version in ("degraded", "swinir", "v1", "v2"):
        image = np.asarray(Image.open(out / version / "portrait.png"), np.float64)
        expected = 10 * np.log10(255.0 ** 2 / np.mean((image - clean) ** 2))
        assert abs(metrics["per_photo"]["portrait"][version]["psnr"] - expected) < 1e-6
        assert f"{metrics['mean'][version]['psnr']:6.2f} dB" in printed
    assert np.asarray(Image.open(out / "sheet.png")).std() > 0
    for stage in ("unpack the zoo", "restore v1", "restore v2", "total"):
        assert stage in (out / "timing.md").read_text()
