"""bench/scan_layers.py on tiny sizes: it compiles and runs both layouts and prints their rows (the figures are the
bench's, never asserted)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_bench_compiles_and_runs_both_layouts():
    proc = subprocess.run([sys.executable, "bench/scan_layers.py", "--compile-variant", "tiny-sdxl", "--compile-latent",
                           "8", "--stack", "2x4x128", "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    compiled = re.findall(r"^(forward|gradient)\s+(unrolled|scanned)\s+[\d.]+\s+[\d.]+\s+[\d.]+$", proc.stdout, re.M)
    assert sorted(compiled) == sorted((p, s) for p in ("forward", "gradient") for s in ("unrolled", "scanned"))
    ran = re.findall(r"^(forward|gradient)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+, [\d.]+$", proc.stdout, re.M)
    assert ran == ["forward", "gradient"], proc.stdout
