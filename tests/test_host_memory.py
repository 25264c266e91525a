"""diffbody_jax.host_memory: when `diffbody` re-runs itself with glibc's malloc on transparent huge pages, and that
the re-run process really gets them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from diffbody_jax.host_memory import OPT_OUT, TUNABLE, hugepage_environment

QUALIFIED = dict(glibc=(2, 36), thp_mode="madvise", system="Linux")


def test_sets_the_tunable_where_it_helps():
    env = hugepage_environment({"PATH": "/bin"}, **QUALIFIED)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}


def test_keeps_other_tunables():
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **QUALIFIED)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("environ, overrides", [
    ({OPT_OUT: "0"}, {}),                                   # the user turned it off
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, {}),               # the user chose a value
    ({"GLIBC_TUNABLES": f"{TUNABLE}=1"}, {}),               # already re-run: no loop
    ({}, dict(system="Darwin")),
    ({}, dict(glibc=(2, 34))),                              # the tunable does not exist there
    ({}, dict(thp_mode="never")),
])
def test_changes_nothing(environ, overrides):
    assert hugepage_environment(environ, **{**QUALIFIED, **overrides}) is None


PROBE = textwrap.dedent("""
    import json, os, resource, sys
    from diffbody_jax.host_memory import reexec_with_hugepages
    reexec_with_hugepages()
    # what XLA:CPU's temporaries get: one large malloc, written once (ctypes' malloc is glibc's)
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ptr = libc.malloc(size)
    ctypes.memset(ptr, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults,
                      "argv": sys.argv[1:]}))
""")


def _probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE, "an-arg", "--flag=1"], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_rerun_process_faults_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    small_pages = (256 << 20) // 4096
    expected = hugepage_environment(env)
    got = _probe(env)
    assert got["argv"] == ["an-arg", "--flag=1"]  # the same command line, executed again
    if expected is None:  # a machine where it changes nothing (see test_changes_nothing): no re-run
        assert got["tunables"] == "" and got["faults"] >= small_pages // 2
        return
    assert got["tunables"] == expected["GLIBC_TUNABLES"]
    # 2 MiB pages: 128 faults for 256 MiB, against 65,536 of 4 KiB (a loose bound: the kernel may fall back to
    # small pages where it finds no free 2 MiB block)
    assert got["faults"] < small_pages // 8, got
    opted_out = _probe({**env, OPT_OUT: "0"})
    assert opted_out["tunables"] == "" and opted_out["faults"] >= small_pages // 2, opted_out
