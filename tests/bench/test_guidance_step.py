"""bench/guidance_step.py's memory rows on the tiny v1 group: `plan_restore` compiles the restoration with every
step guided, whose temporaries exceed the unguided program's (it keeps the forward's activations for the gradient
through the UNet, ControlNet, VAE decode and part network); the figures themselves are a bench's, never asserted."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_guided_program_needs_more_memory_than_the_unguided_one():
    proc = subprocess.run([sys.executable, "bench/guidance_step.py", "--memory-sizes", "tiny:64x64", "--memory-steps",
                           "1", "--time-presets", "", "--remat", "none"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^tiny\s+64x64\s+(on|off)\s+none\s+([\d.]+)", proc.stdout, re.M)
    temps = dict((guided, float(mib)) for guided, mib in rows)
    assert set(temps) == {"on", "off"}, proc.stdout
    assert temps["on"] > temps["off"], temps

