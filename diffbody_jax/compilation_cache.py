"""The persistent XLA compilation cache of `diffbody restore`, `eval`, `demo` and `train`.

A compiled program is written to a folder keyed by its HLO, the jax/jaxlib versions, the device kind and the
compile options, so a second run of the same command on the same machine reads its programs instead of compiling
them (JAX's own cache, `jax_compilation_cache_dir`; nothing here decides what matches).

    cache = use_compilation_cache(args.compilation_cache)   # before the first jit
    ...
    print(cache.summary())   # "compilation cache ~/.cache/diffbody_jax/xla: 12 of 14 programs read from it"

Where: `--compilation-cache DIR`, else $DIFFBODY_COMPILATION_CACHE, else a folder already given to JAX
($JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/diffbody_jax/xla (~/.cache/diffbody_jax/xla); `off` (flag or
variable) turns it off.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

ENV = "DIFFBODY_COMPILATION_CACHE"
OFF = "off"
# Programs that compile faster than this are not written: reading a file costs about as much as compiling them.
MIN_COMPILE_SECONDS = 0.2

_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffbody_jax" / "xla"


def resolve_cache_dir(flag: str | None = None) -> Path | None:
    """The cache folder a command uses: the flag, else the environment variable, else JAX's, else the default;
    None if `off`."""
    where = flag if flag is not None else os.environ.get(ENV)
    if where is None or where == "":
        given = jax.config.jax_compilation_cache_dir
        return Path(given) if given else default_cache_dir()
    if where.strip().lower() == OFF:
        return None
    return Path(where).expanduser()


@dataclasses.dataclass
class CompilationCache:
    """The folder in use (None: off) and how many compiled programs this process asked it for and read from it."""

    folder: Path | None
    requests: int = 0
    hits: int = 0

    def summary(self) -> str:
        if self.folder is None:
            return "compilation cache off"
        return f"compilation cache {self.folder}: {self.hits} of {self.requests} programs read from it"


# The cache that counts this process's compiles: the latest `use_compilation_cache`'s. One listener serves them all
# (jax.monitoring keeps every listener registered for the life of the process).
_counting: CompilationCache | None = None


def _count(event: str, **_) -> None:
    if _counting is None:
        return
    if event == _REQUESTS:
        _counting.requests += 1
    elif event == _HITS:
        _counting.hits += 1


def use_compilation_cache(flag: str | None = None) -> CompilationCache:
    """Point JAX's persistent compilation cache at the resolved folder (creating it) and count its use.

    Call once per process, before the first compile. A folder that cannot be created is an error naming it.
    """
    folder = resolve_cache_dir(flag)
    cache = CompilationCache(folder)
    if folder is None:
        return cache
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache folder {folder}: cannot create it ({e.strerror}); "
                         f"--compilation-cache {OFF} or {ENV}={OFF} turns the cache off") from e
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    global _counting
    if _counting is None:
        jax.monitoring.register_event_listener(_count)
    _counting = cache
    return cache
