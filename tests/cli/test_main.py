"""The `diffbody` command: subcommands, usage errors with exit 2, configs by name from any directory."""

import os
import pathlib
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


def test_the_console_script_runs_a_command_in_its_own_process(tmp_path):
    """The installed `diffbody` entry point (other tests call cli.main.main in-process, as README's commands run)."""
    script = pathlib.Path(sys.executable).parent / "diffbody"
    out = subprocess.run([str(script), "data", "sample-set", "--out", str(tmp_path / "s")], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "manifest.jsonl").is_file()
    out = subprocess.run([str(script), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_zoo_refuses_a_non_positive_steps_scale_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "--out", str(tmp_path / "zoo"), "--steps-scale", "0"])
    assert exit_info.value.code == 2 and "--steps-scale must be positive, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()
