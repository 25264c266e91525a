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
    assert demo(["--out", str(tmp_path / "demo"), "--fast"]) == 0
    summary = _check_outputs(tmp_path / "demo", capsys)
    assert summary["sampling_steps"] == {"v1": 2, "v2": 2} and summary["train_steps"] == 10
    # a second run replaces a demo folder; a foreign folder is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert demo(["--out", str(tmp_path / "mine"), "--fast"]) == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


@pytest.mark.slow  # ~2.5 minutes: 400 SwinIR steps, DDPM 50 (v1) and 2 x 200 (v2) steps
def test_full_demo_trains_swinir_past_the_degraded_inputs(tmp_path, capsys):
    assert demo(["--out", str(tmp_path / "demo")]) == 0
    summary = _check_outputs(tmp_path / "demo", capsys)
    assert summary["sampling_steps"] == {"v1": 50, "v2": 200}
    assert summary["swinir_psnr_restored"] > summary["swinir_psnr_degraded"] + 1.0
