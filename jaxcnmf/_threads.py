"""Host thread pools for the CPU backend: how many threads, and a map that keeps the caller's jax settings.

XLA's CPU backend runs some computations on one core (a vmapped deconvolution's sequential pool merging, an FFT of a
block of pixels) and numpy's medians hold one core; dispatching independent blocks from a thread per core uses the
others. jax keeps configuration set by context managers (`jax.enable_x64(True)`, as the float64 reference tests
use) per thread, so a worker thread would silently compute in float32: `thread_map` re-enters the caller's x64 mode
in every worker.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import jax

T = TypeVar("T")
R = TypeVar("R")


def host_threads(limit: int = 8) -> int:
    """Threads for host-side work: one per core this process may use, at most `limit`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(limit), cores))


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """`[fn(x) for x in items]` computed by a `Pool` of `workers` threads (None: `host_threads()`); exceptions
    propagate. One worker, or one item, runs in the calling thread."""
    items = list(items)
    workers = host_threads() if workers is None else max(1, int(workers))
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with Pool(min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


class Pool:
    """A thread pool whose `submit` and `map` run under the x64 mode of the thread that made the pool."""

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(host_threads() if workers is None else max(1, int(workers)))
        self._x64 = bool(jax.config.jax_enable_x64)

    def _wrap(self, fn):
        x64 = self._x64

        def call(*args):
            with jax.enable_x64(x64):
                return fn(*args)

        return call

    def submit(self, fn, *args):
        return self._pool.submit(self._wrap(fn), *args)

    def map(self, fn, *iterables):
        return self._pool.map(self._wrap(fn), *iterables)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown()
        return False

    def shutdown(self):
        self._pool.shutdown()
