"""The package's imports only go down (no cycle; models/ imports nothing above it): tools/import_layers.py, the
team's checker kept in the repo so a clean clone runs it wherever it lies."""

import subprocess
import sys

from tests.torch_ref import REPO

CHECKER = REPO / "tools" / "import_layers.py"


def test_imports_only_go_down():
    out = subprocess.run([sys.executable, str(CHECKER), str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no cycle, nothing above models/ imported by models/" in out.stdout, out.stdout
