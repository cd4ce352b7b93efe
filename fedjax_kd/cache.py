"""JAX's persistent compilation cache, on by default for the ``fedjax-kd`` commands.

A second ``fedjax-kd run`` of the same config (and every sweep point whose
compiled programs are the same) loads its executables from disk instead of
compiling them again; what is left of ``compile_s`` is tracing and lowering.
An executable loaded from the cache is the one XLA compiled, so results are
bit-identical with the cache on or off (``tests/test_cache.py``).

Where it lives:

* ``$FEDJAX_KD_CACHE_DIR`` when set (``off``, ``0`` or an empty value
  disables the cache);
* else ``$XDG_CACHE_HOME/fedjax_kd/jax`` or ``~/.cache/fedjax_kd/jax``.

``fedjax-kd run|sweep|bench --no-compile-cache`` disables it for one command.
JAX's own settings win: with ``JAX_COMPILATION_CACHE_DIR`` set (or
``jax_compilation_cache_dir`` configured in the process) nothing is changed.
Every program is cached, however fast it compiled
(``jax_persistent_cache_min_compile_time_secs = 0``): the rounds here compile
in 1-7 s, but the many small evaluation and initialisation programs add up.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "FEDJAX_KD_CACHE_DIR"
_OFF = ("", "0", "off", "false", "no", "none")


def default_dir() -> Path | None:
    """The cache directory this process would use, or None when it is disabled."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedjax_kd" / "jax"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on; returns its directory (None: off).

    Args:
      directory: where to keep it (default :func:`default_dir`).

    Does nothing (and returns JAX's directory) when JAX's cache directory is
    already set, by ``JAX_COMPILATION_CACHE_DIR`` or in this process. A
    directory that cannot be created leaves the cache off, silently: the
    cache only saves time, it never decides a result.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = Path(directory) if directory is not None else default_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
