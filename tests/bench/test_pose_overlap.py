"""bench/pose_overlap.py runs end to end on a small batch: the engine's annotated-pose hook inline, in a pool, and
prefetched (the timings themselves are a bench figure, docs/scaling.md, never asserted here)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pose_overlap_prints_the_four_host_sides():
    proc = subprocess.run([sys.executable, "bench/pose_overlap.py", "--batch", "2", "--size", "128", "--workers", "1",
                           "--steps", "1", "--device-s", "0.01"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (inline|prefetched), (one process|pool of 1) \| ([0-9.]+) \| ([0-9.]+)x \|$",
                      proc.stdout, re.M)
    assert len(rows) == 4, proc.stdout
