"""The persistent XLA compilation cache that `fit` and the CLI turn on: compiled programs kept on disk between runs.

Below every stage (it only sets JAX options); `fit.fit` and `cli.main` call `enable_compilation_cache` first.
"""

from __future__ import annotations

import os

CACHE_ENV = "JAXCNMF_CACHE_DIR"
MIN_COMPILE_SECS = 0.2  # programs that compile faster than this are not written (the many tiny eager ops)

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
