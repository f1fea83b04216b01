"""Tests of component quality: the snr and r-value against direct numpy references, and the acceptance rule on
true components (accepted) and noise fitted into blobs (rejected)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.errors import ParameterError
from jaxcnmf.quality import evaluate_components, spatial_consistency, trace_snr


def test_trace_snr_matches_direct_computation():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 200))
    X[1, 50:55] += 8.0  # a transient of 5 frames
    X[2, 90] += 30.0  # a single-frame outlier: not sustained
    X[3] = 0.0  # flat
    with jax.enable_x64(True):
        got = np.asarray(trace_snr(jnp.asarray(X), n_consecutive=3))
    for k in range(4):
        x = X[k]
        m = np.median(x)
        low = x[x <= m]
        sd = np.sqrt(np.mean((low - m) ** 2))
        if sd == 0:
            assert got[k] == 0
            continue
        z = (x - m) / sd
        ref = max(0.0, max(z[t : t + 3].min() for t in range(len(x) - 2)))
        np.testing.assert_allclose(got[k], ref, rtol=1e-10)
    assert got[1] > 5 and got[2] < 3


def test_spatial_consistency_matches_direct_computation():
    rng = np.random.default_rng(1)
    d, T, K = 30, 80, 3
    A = np.maximum(rng.standard_normal((d, K)), 0)
    C = np.maximum(rng.standard_normal((K, T)), 0)
    b = rng.random((d, 1))
    f = rng.random((1, T))
    Y = A @ C + b @ f + 0.3 * rng.standard_normal((d, T))
    nbhd = rng.random((d, K)) < 0.7
    with jax.enable_x64(True):
        got = np.asarray(spatial_consistency(jnp.asarray(Y), A, C, b, f, jnp.asarray(nbhd), n_top=7))
    for k in range(K):
        top = np.argsort(-C[k], kind="stable")[:7]
        others = [j for j in range(K) if j != k]
        resid = Y - b @ f - A[:, others] @ C[others]
        M = resid[:, top].mean(axis=1)
        ref = np.corrcoef(A[nbhd[:, k], k], M[nbhd[:, k]])[0, 1]
        np.testing.assert_allclose(got[k], ref, rtol=1e-10)


def test_local_r_values_equal_the_dense_form(sim_with_fakes):
    """evaluate_components takes r-values from each neighbourhood's own pixels and top frames when the
    neighbourhoods are local: equal to `spatial_consistency`'s dense product (float64: to rounding), including an
    all-zero trace and an empty neighbourhood."""
    from jaxcnmf.quality import _spatial_consistency_local
    from jaxcnmf.spatial import search_areas
    from jaxcnmf.temporal import column_pixels

    Yr, A, C, b, f, *_ = sim_with_fakes
    C = C.copy()
    C[3] = 0.0  # an inactive component: r = 0 in both forms
    nbhd = np.array(search_areas(A, (64, 64), 4.0, threshold=0.0))
    nbhd[:, 5] = False  # an empty neighbourhood
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (Yr, A, C, b, f)]
        dense = np.asarray(spatial_consistency(*args, jnp.asarray(nbhd), n_top=20))
        local = np.asarray(_spatial_consistency_local(*args, *column_pixels(nbhd), n_top=20))
    np.testing.assert_allclose(local, dense, rtol=1e-9, atol=1e-12)
    assert dense[3] == 0 and dense[5] == 0 and np.abs(dense).max() > 0.5


@pytest.fixture(scope="module")
def sim_with_fakes():
    sim = pytest.importorskip("jaxcnmf.sim")
    movie, truth = sim.simulate(seed=3, shape=(64, 64), n_frames=400, n_neurons=10, peak_snr=3.0, overlap=0.3)
    T, d = 400, 64 * 64
    Yr = movie.reshape(T, d).T
    A = truth.A.reshape(10, d).T.astype(np.float32)
    C = truth.C.astype(np.float32)
    b = truth.b.reshape(truth.b.shape[0], d).T
    f = truth.f
    # five noise-only "components": blobs away from every neuron, with the clipped projection of the residual
    # as their trace (what a fit would make of noise)
    yy, xx = np.mgrid[:64, :64]
    free = truth.A.max(0) <= 0.01
    rng = np.random.default_rng(0)
    fakes = []
    while len(fakes) < 5:
        r, c = rng.integers(6, 58, 2)
        if free[r - 6 : r + 7, c - 6 : c + 7].all():
            fakes.append(np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 8.0).ravel())
            free[r - 6 : r + 7, c - 6 : c + 7] = False
    Af = np.stack(fakes, 1).astype(np.float32)
    Af[Af < 0.05] = 0
    resid = Yr - A @ C - b @ f
    Cf = np.maximum(Af.T @ resid / (Af**2).sum(0)[:, None], 0)
    A_all, C_all = np.hstack([A, Af]), np.vstack([C, Cf])
    YrA = A_all.T @ (Yr - A_all @ C_all - b @ f) / (A_all**2).sum(0)[:, None]
    return Yr, A_all, C_all, b, f, truth.sn.ravel(), YrA, sim.peak_snr(truth)


def test_true_components_accepted_noise_rejected(sim_with_fakes):
    Yr, A, C, b, f, sn, YrA, snr_true = sim_with_fakes
    q = evaluate_components(Yr, A, C, b, f, sn, YrA, fps=30.0)
    acc = np.asarray(q.accepted)
    active = snr_true >= 1.0  # neurons that fire at all in these 400 frames
    assert acc[:10][active].all(), (np.asarray(q.snr), np.asarray(q.r_value))
    assert not acc[10:].any(), (np.asarray(q.snr), np.asarray(q.r_value))
    assert np.asarray(q.r_value)[:10][active].min() > 0.9
    assert np.asarray(q.snr)[10:].max() < 2.5
    # the same with the neighbourhood built by dilation
    q2 = evaluate_components(Yr, A, C, b, f, sn, YrA, shape=(64, 64), radius=4.0)
    assert np.asarray(q2.accepted)[:10][active].all() and not np.asarray(q2.accepted)[10:].any()


def test_empty_and_bad_inputs():
    Yr = np.zeros((16, 20), np.float32)
    q = evaluate_components(Yr, np.zeros((16, 0)), np.zeros((0, 20)), np.zeros((16, 1)), np.ones((1, 20)),
                            np.ones(16), np.zeros((0, 20)))
    assert q.snr.shape == (0,) and q.accepted.shape == (0,)
    A = np.zeros((16, 2))
    q = evaluate_components(Yr, A, np.zeros((2, 20)), np.zeros((16, 1)), np.ones((1, 20)), np.ones(16),
                            np.zeros((2, 20)))
    assert not np.asarray(q.accepted).any()  # empty components are never accepted
    with pytest.raises(ParameterError, match="YrA"):
        evaluate_components(Yr, A, np.zeros((2, 20)), np.zeros((16, 1)), np.ones((1, 20)), np.ones(16),
                            np.zeros((2, 19)))
    with pytest.raises(ParameterError, match="fps"):
        evaluate_components(Yr, A, np.zeros((2, 20)), np.zeros((16, 1)), np.ones((1, 20)), np.ones(16),
                            np.zeros((2, 20)), fps=-1.0)


def test_acceptance_rule_is_the_documented_one(sim_with_fakes):
    Yr, A, C, b, f, sn, YrA, _ = sim_with_fakes
    q = evaluate_components(Yr, A, C, b, f, sn, YrA, fps=30.0, min_snr=4.0, rval_thr=0.95, snr_lowest=2.0,
                            rval_lowest=0.6)
    snr, r = np.asarray(q.snr), np.asarray(q.r_value)
    expected = ((snr >= 4.0) & (r >= 0.6)) | ((r >= 0.95) & (snr >= 2.0))
    np.testing.assert_array_equal(np.asarray(q.accepted), expected & (np.asarray(C).max(1) > 0))
    assert expected.any() and not expected.all()
