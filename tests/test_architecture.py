"""The package's imports only go down (no cycle; models/ imports nothing above it): the project's checker."""

import subprocess
import sys

import pytest

from tests.torch_ref import REPO

CHECKER = REPO.parent / "shared" / "tools" / "import_layers.py"


@pytest.mark.skipif(not CHECKER.is_file(), reason="shared/tools/import_layers.py is not beside this checkout")
def test_imports_only_go_down():
    out = subprocess.run([sys.executable, str(CHECKER), str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no cycle, nothing above models/ imported by models/" in out.stdout, out.stdout
