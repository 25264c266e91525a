"""Suite-wide fixtures and rules.

- Seeds: every run draws a fresh session seed (or takes DIFFBODY_TEST_SEED); each test's seed is derived from it
  and the test's id, so `DIFFBODY_TEST_SEED=<n> pytest path::test` replays a failure exactly. The `rng` fixture
  is a numpy Generator on that seed, `seed` the integer; numpy's legacy global RNG, Python's `random` and torch's
  global RNG (random weights of the PyTorch references) are seeded with it before every test. A failed test's
  report carries its seed.
- XLA executables are kept in a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default a folder in the
  system's temp dir) shared by the pytest workers and the subprocess tests: the training tests compile the same
  train step in several runs and processes. XLA:CPU compiles with its cheaper optimisation level (see below).
- Under CI=true a skip is a failure: .ci/run installs every reference package, so a parity test that skips
  means a broken install, not a missing optional extra.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import tempfile
import zlib
from pathlib import Path

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"diffbody-jax-cache-{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("DIFFBODY_COMPILATION_CACHE", CACHE_DIR)  # the commands run in tests: not ~/.cache
# The suite compiles far more than it runs: without LLVM's expensive passes XLA:CPU compiles ~25% faster (measured
# on the stage-1 phase tests). DIFFBODY_TEST_FULL_OPT=1 keeps XLA's defaults.
if os.environ.get("DIFFBODY_TEST_FULL_OPT") != "1":
    FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import torch

    # CI has 2 cores; more intra-op threads than that only adds contention with XLA.
    torch.set_num_threads(2)
except ImportError:
    torch = None

SEED_ENV = "DIFFBODY_TEST_SEED"
SESSION_SEED = int(os.environ.get(SEED_ENV) or secrets.randbits(31))
os.environ[SEED_ENV] = str(SESSION_SEED)  # pytest-xdist workers, started after this, share the session seed
IN_CI = os.environ.get("CI", "").lower() == "true"


def seed_of(nodeid: str) -> int:
    """The seed of one test: a function of the session seed and the test id only."""
    return (SESSION_SEED * 1_000_003 + zlib.crc32(nodeid.encode())) % (1 << 31)


def pytest_report_header(config):
    return f"test seed: {SEED_ENV}={SESSION_SEED}{'  (CI: skips fail)' if IN_CI else ''}"


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    s = seed_of(request.node.nodeid)
    request.node.user_properties.append(("seed", s))
    np.random.seed(s)
    random.seed(s)
    if torch is not None:
        torch.manual_seed(s)
    yield


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """A worker runs hundreds of tests in one process, and what they compile stays cached: one worker's RSS passed
    6 GB a third of the way through the suite, and a worker died on CI (24 GB for two workers and their
    subprocesses). After each module its compiled programs are dropped (programs that took over a second to
    compile come back from the persistent cache above) and glibc hands freed memory back to the system
    (measured: 1.62 -> 0.49 GB after four restores' programs)."""
    yield
    import ctypes
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory stays with the process
        pass


@pytest.fixture
def seed(request) -> int:
    """This test's integer seed (also printed in the report when the test fails)."""
    return seed_of(request.node.nodeid)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A numpy Generator on this test's seed: fresh every run, replayable with DIFFBODY_TEST_SEED."""
    return np.random.default_rng(seed)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"test seed {seed_of(item.nodeid)}; replay with "
                                        f"{SEED_ENV}={SESSION_SEED} python -m pytest '{item.nodeid}'"))
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (every reference package is installed there): {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid}: module skipped under CI=true (every reference package is "
                           f"installed there): {_skip_reason(report)}")



def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` writes once per test run, shared by every pytest-xdist worker: the first worker to
    ask builds it under a file lock in the run's common temp folder, the others wait and read it. Read-only for
    the tests (a test that changes it works on a copy)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            if folder.exists():  # a worker died half-way: start again
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def stand_in_weights(tmp_path_factory):
    """The tiny stand-in weights folder of both versions (`pipelines.stand_in`), with its components' contracts:
    written once per test run and shared by the workers. Tests that change it work on a copy."""
    from diffbody_jax.pipelines.stand_in import write_stand_in_weights

    return shared_folder(tmp_path_factory, "stand-in", lambda out: write_stand_in_weights(out / "w", seed=3)) / "w"


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory, stand_in_weights) -> tuple[Path, int]:
    """(folder, seed) of the suite's 8-host-device checks (tests/eight_devices.py), run once per test run in one
    subprocess; each check's test reads its outputs with `eight_devices.outputs(folder, name)`."""
    from tests import eight_devices

    seed = seed_of("eight-devices")
    return shared_folder(tmp_path_factory, "eight-devices",
                         lambda folder: eight_devices.run_all(folder, seed, stand_in_weights)), seed
