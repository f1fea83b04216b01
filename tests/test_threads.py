"""The host thread pools keep the caller's jax x64 mode (jax keeps it per thread) and propagate errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf._threads import Pool, host_threads, thread_map


def _dtype(_):
    return jnp.asarray(np.ones(2)).dtype


def test_workers_compute_in_the_callers_x64_mode():
    with jax.enable_x64(True):
        assert thread_map(_dtype, range(4), workers=2) == [jnp.float64] * 4
        with Pool(2) as pool:
            assert pool.submit(_dtype, 0).result() == jnp.float64
            assert list(pool.map(_dtype, range(3))) == [jnp.float64] * 3
    with jax.enable_x64(False):
        assert thread_map(_dtype, range(4), workers=2) == [jnp.float32] * 4


def test_thread_map_keeps_order_and_raises():
    assert thread_map(lambda x: x * x, range(10), workers=3) == [x * x for x in range(10)]
    assert thread_map(lambda x: x, [], workers=2) == []

    def boom(x):
        if x == 3:
            raise ValueError("item 3")
        return x

    with pytest.raises(ValueError, match="item 3"):
        thread_map(boom, range(6), workers=2)
    assert 1 <= host_threads() <= 8 and host_threads(limit=1) == 1
