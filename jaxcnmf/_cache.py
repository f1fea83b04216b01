"""The persistent XLA compilation cache that `fit` and the CLI turn on: compiled programs kept on disk between runs.

Below every stage (it only sets JAX options); `fit.fit` and `cli.main` call `enable_compilation_cache` first.
"""

from __future__ import annotations

import os

CACHE_ENV = "JAXCNMF_CACHE_DIR"
MIN_COMPILE_SECS = 0.0  # programs that compile faster than this are not written
# 0: every program, the many small ones too. A 256x256x3000 fit compiles about 250 programs, most under 0.2 s each;
# with only those of 0.2 s or more kept (7 programs), a later process's first fit of the same movie took 16.3 s
# (6.7 s of XLA compilation), with all kept 11.9 s (0.9 s; the warm fit 7.5-7.9 s), for 2.1 MB of cache.

_done = False


def default_cache_dir() -> str:
    """`$JAXCNMF_CACHE_DIR` if set (an empty value turns the cache off), else `~/.cache/jaxcnmf/xla`."""
    return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "jaxcnmf", "xla"))


def enable_compilation_cache() -> str | None:
    """Keep compiled XLA programs on disk between runs (most of a first fit's time can be compilation: on a 2-core
    CPU about 60 of 160 s for 256x256x3000), once per process.

    The folder is `default_cache_dir()`; set `JAXCNMF_CACHE_DIR=""` to turn it off. A cache folder the caller has
    already given JAX (`jax.config.update("jax_compilation_cache_dir", ...)`) is left as it is, as is a JAX that
    refuses the options (an older version, an unwritable home). Results do not depend on it: the same programs are
    compiled, just not twice.

    **Returns:** the cache folder in use, or `None` when there is none.
    """
    global _done
    import jax

    if _done:
        return jax.config.jax_compilation_cache_dir or None
    _done = True
    if jax.config.jax_compilation_cache_dir:  # the caller's own choice
        return jax.config.jax_compilation_cache_dir
    folder = default_cache_dir()
    if not folder:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    except Exception:  # an unwritable home or an older jax: run without the cache
        return None
    return folder
