"""The persistent compilation cache of the commands (diffbody_jax/compilation_cache.py): where it lives, and that a
second `diffbody restore` reads its programs from it instead of compiling them, with the same output."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.compilation_cache import ENV, default_cache_dir, resolve_cache_dir, use_compilation_cache
from diffbody_jax.pipelines.stand_in import write_stand_in_weights

ROOT = Path(__file__).resolve().parents[1]


def test_the_flag_beats_the_variable_and_off_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffbody_jax" / "xla"
    monkeypatch.setenv(ENV, str(tmp_path / "from-env"))
    assert resolve_cache_dir() == tmp_path / "from-env"
    assert resolve_cache_dir(str(tmp_path / "from-flag")) == tmp_path / "from-flag"
    assert resolve_cache_dir("off") is None
    monkeypatch.setenv(ENV, "OFF")
    assert resolve_cache_dir() is None
    assert resolve_cache_dir(str(tmp_path / "from-flag")) == tmp_path / "from-flag"
    assert use_compilation_cache("off").summary() == "compilation cache off"


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=re.escape(str(blocker / "xla")) + ".*--compilation-cache off"):
        use_compilation_cache(str(blocker / "xla"))


def _restore(weights: Path, photo: Path, out: Path, cache: Path, home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(home)  # whatever the code does by default stays in the test's folder
    done = subprocess.run(
        [sys.executable, "-m", "diffbody_jax.cli.main", "restore", str(photo), "--out", str(out), "--weights",
         str(weights), "--version", "v1", "--size", "64", "--sampler", "ddim", "--steps", "2", "--annotator",
         "none", "--compilation-cache", str(cache)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_second_restore_reads_its_programs_from_the_cache(tmp_path, rng):
    weights = write_stand_in_weights(tmp_path / "w", seed=3, versions=("v1",))
    Image.fromarray((rng.uniform(0, 1, (64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    cache = tmp_path / "cache"

    def read_from(stdout):
        m = re.search(rf"compilation cache {re.escape(str(cache))}: (\d+) of (\d+) programs read from it", stdout)
        assert m, stdout
        return int(m[1]), int(m[2])

    first = read_from(_restore(weights, tmp_path / "photo.png", tmp_path / "first", cache, tmp_path / "home"))
    written = [f for f in cache.iterdir() if not f.name.endswith("-atime")]
    second = read_from(_restore(weights, tmp_path / "photo.png", tmp_path / "second", cache, tmp_path / "home"))
    print(f"first run: {first[0]} of {first[1]} read, {len(written)} written; second: {second[0]} of {second[1]}")
    assert first[0] == 0 and first[1] > 0
    assert len(written) > 0 and second[0] >= len(written) and second[1] == first[1]
    # the restoration program itself (the pipeline's jitted __call__, sampler inside), not only the small ones: a host
    # callback in it (--step-progress) would keep JAX from writing it
    assert any(f.name.startswith("jit___call-") for f in written), sorted(f.name for f in written)
    assert not (tmp_path / "home").exists()  # the flag's folder, nothing under the default one
    a, b = (np.asarray(Image.open(tmp_path / run / "photo.png")) for run in ("first", "second"))
    np.testing.assert_array_equal(a, b)
