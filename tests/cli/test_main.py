"""The `diffbody` command: subcommands, usage errors with exit 2, configs by name from any directory."""

import subprocess
import sys

import pytest

from diffbody_jax.cli.main import main
from tests.torch_ref import REPO


def test_subcommands_dispatch_and_usage_errors_say_so(tmp_path, capsys):
    assert main(["data", "sample-set", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "manifest.jsonl").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["restore"])
    assert exit_info.value.code == 2 and "required" in capsys.readouterr().err
    assert main(["train", "--config", "swinir:variant=tiny-diffbir", "--workdir", str(tmp_path / "run")]) == 1
    assert "data.manifest is empty" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


def test_runs_from_any_directory_with_config_names(tmp_path):
    """A module run from a foreign working directory; the config is named, not given by path."""
    out = subprocess.run([sys.executable, "-m", "diffbody_jax.cli.main", "convert", "init-from-unet", "--unet",
                          str(tmp_path / "missing"), "--config", "controlnet:variant=tiny-v1", "--dst",
                          str(tmp_path / "x")], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    # the config was found (the error is about the missing UNet folder, not the config)
    assert out.returncode == 2, out.stderr
    assert "missing" in out.stderr and "config file" not in out.stderr
