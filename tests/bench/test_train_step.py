"""bench/train_step.py on tiny-sd21: both children take the same step from the same weights file, so their first
losses agree (ours converted by the interop table, torch's from diffusers' UNet); the times are a bench figure,
never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_both_sides_take_the_same_step_in_their_own_processes(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--rows", "tiny-sd21:2x8", "--warmup", "1",
                           "--repeats", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert (row["variant"], row["batch"], row["latent"]) == ("tiny-sd21", 2, 8)
    ours, torch = row["first_loss"]
    assert abs(ours - torch) <= 1e-4, (ours, torch)
    assert "| tiny-sd21 | 1.5M | 2x8x8 |" in proc.stdout
