"""bench/train_step.py on the tiny UNet and the tiny v1 ControlNet: both children take the same step from the same
weights files, so their first losses agree (ours converted by the interop tables, torch's from diffusers' UNet and
tests/torch_ref.py's ControlNet twin); the times are a bench figure, never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_both_sides_take_the_same_step_in_their_own_processes(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--rows", "tiny-sd21:2x8,controlnet/tiny-v1:2x8",
                           "--warmup", "1", "--repeats", "1", "--min-seconds", "0", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["batch"], r["latent"]) for r in rows] == [("tiny-sd21", 2, 8),
                                                                       ("controlnet/tiny-v1", 2, 8)]
    for row in rows:
        ours, torch = row["first_loss"]
        assert abs(ours - torch) <= 1e-4, (row["variant"], ours, torch)
    assert "| tiny-sd21 | 1.5M | 2x8x8 |" in proc.stdout
