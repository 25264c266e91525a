"""Transparent huge pages for XLA:CPU's temporaries: `diffbody` re-runs itself once with glibc's malloc asking for
them.

XLA:CPU allocates a program's temporaries (0.28 GiB for tiny-sd21's training step at 4x32x32) with one
`posix_memalign` per execution. glibc serves it by `mmap` and returns it after, so every step faults 4 KiB pages
in again (74,000 faults per tiny step) and walks them through a TLB that holds few of them. Where the kernel's
transparent huge pages are "madvise" (Debian's and Ubuntu's default), glibc >= 2.35 advises its own mappings when
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: ~300 faults per step, and tiny-sd21's train step 285 -> 215 ms on a
2-core AMD EPYC (docs/performance.md). The variable is read once, when the process starts, so the `diffbody`
command sets it and executes itself again, before jax is imported.

    environ = hugepage_environment(os.environ)   # None: nothing to change here
    reexec_with_hugepages()                      # the console script's first call

Off with DIFFBODY_HUGEPAGES=0. Nothing is done off Linux, on a libc other than glibc >= 2.35, where the kernel's
transparent huge pages are "never", or where GLIBC_TUNABLES already names glibc.malloc.hugetlb. On GPU and TPU
hosts the device memory is not malloc's, and the host side is unchanged in what it computes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT = "DIFFBODY_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)  # the first glibc with the glibc.malloc.hugetlb tunable


def _glibc_version() -> tuple[int, ...] | None:
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        return None
    return tuple(int(v) for v in version.split(".")[:2] if v.isdigit())


def _thp_mode(path: Path = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), the bracketed word of `path`."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


def hugepage_environment(environ: Mapping[str, str], glibc: tuple[int, ...] | None = None,
                         thp_mode: str | None = None, system: str | None = None) -> dict[str, str] | None:
    """The environment to execute this process again with, or None where nothing would change (see the module
    docstring). glibc, thp_mode and system default to this machine's."""
    if environ.get(OPT_OUT, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    if (system or platform.system()) != "Linux":
        return None
    glibc = glibc if glibc is not None else _glibc_version()
    if glibc is None or glibc < MIN_GLIBC or (thp_mode or _thp_mode()) in (None, "never"):
        return None
    tunables = ":".join(filter(None, (environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1")))
    return {**environ, "GLIBC_TUNABLES": tunables}


def reexec_with_hugepages() -> None:
    """Execute this process's own command line again with `hugepage_environment` (no return), or return at once
    where it changes nothing. Call first thing in a console script, never from a library or a test process."""
    environ = hugepage_environment(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
