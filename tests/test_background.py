"""Background stage: HALS on the residual against exact non-negative least squares (scipy) and the exact rank-1 case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

from jaxcnmf.background import init_background, update_background


def _problem(seed=0, d=60, T=80, K=3, nb=2, noise=0.05):
    rng = np.random.default_rng(seed)
    A = np.maximum(rng.normal(size=(d, K)), 0) * (rng.random((d, K)) < 0.3)
    C = np.maximum(rng.normal(size=(K, T)), 0)
    b = rng.random((d, nb)) + 0.1
    f = rng.random((nb, T)) + 0.5
    Y = A @ C + b @ f + noise * rng.normal(size=(d, T))
    return Y, A, C, b, f


def test_rank1_noise_free_is_recovered_exactly():
    with jax.enable_x64(True):
        Y, A, C, b, f = _problem(nb=1, noise=0.0)
        b_est, f_est = update_background(jnp.asarray(Y), A, C, nb=1, n_iter=50)
        np.testing.assert_allclose(np.asarray(b_est @ f_est), b @ f, rtol=1e-8, atol=1e-8)
        assert np.isclose(np.linalg.norm(b_est), 1.0)


@pytest.mark.parametrize("nb", [1, 2])
def test_fixed_point_solves_both_nnls_subproblems(nb):
    """At convergence f is the exact NNLS fit for b fixed (per frame) and b the exact NNLS fit for f fixed (per pixel)."""
    with jax.enable_x64(True):
        Y, A, C, b0, f0 = _problem(seed=nb, nb=nb)
        b, f = init_background(jnp.asarray(Y), A, C, nb=nb)
        b, f = update_background(jnp.asarray(Y), A, C, b, f, n_iter=3000)
        b, f = np.asarray(b), np.asarray(f)
        R = Y - A @ C
        f_ref = np.stack([nnls(b, R[:, t])[0] for t in range(R.shape[1])], axis=1)
        b_ref = np.stack([nnls(f.T, R[i])[0] for i in range(R.shape[0])])
        np.testing.assert_allclose(f, f_ref, atol=1e-6 * np.abs(f_ref).max())
        np.testing.assert_allclose(b, b_ref, atol=1e-6 * np.abs(b_ref).max())
        # and it fits the true background well (noise 0.05 against a background of order 1)
        err = np.linalg.norm(b @ f - b0 @ f0) / np.linalg.norm(b0 @ f0)
        assert err < 0.1


def test_one_f_step_is_exact_nnls_for_rank1():
    """For nb = 1 a single HALS step on f is the exact NNLS solution (per frame), checked against scipy."""
    from jaxcnmf.background import hals_f_step

    with jax.enable_x64(True):
        Y, A, C, b, f = _problem(seed=3, nb=1, noise=0.5)
        b = b + np.random.default_rng(0).normal(size=b.shape)  # a b with mixed signs gives active constraints
        f_new = np.asarray(hals_f_step(b.T @ Y, b.T @ A, C, b.T @ b, f))
        R = Y - A @ C
        f_ref = np.array([nnls(b, R[:, t])[0] for t in range(R.shape[1])]).T
        np.testing.assert_allclose(f_new, f_ref, atol=1e-10)


def test_never_forms_residual_and_keeps_dtype():
    Y, A, C, _, _ = _problem(seed=4)
    b, f = update_background(jnp.asarray(Y, jnp.float32), A, C, nb=2)
    assert b.dtype == jnp.float32 and f.dtype == jnp.float32
    assert b.shape == (Y.shape[0], 2) and f.shape == (2, Y.shape[1])
    assert (np.asarray(b) >= 0).all() and (np.asarray(f) >= 0).all()
