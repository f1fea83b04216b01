"""Merging: a split neuron is put back together, unrelated neighbours are not; rank-1 fit vs the exact SVD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from jaxcnmf.merge import degenerate_components, merge_components, merge_groups, mixture_components, rank1_nmf


def _blob(H, W, r, c, s):
    y, x = np.mgrid[:H, :W]
    a = np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * s**2))
    return np.where(a > 0.05, a, 0.0)


def _spikes(rng, T, rate=0.05, tau=8.0):
    s = (rng.random(T) < rate) * rng.uniform(0.5, 1.5, T)
    return np.convolve(s, np.exp(-np.arange(60) / tau))[:T]


def test_rank1_nmf_matches_truncated_svd():
    """For a non-negative product the best rank-1 approximation is non-negative (Perron-Frobenius): compare with SVD."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        A_S = rng.random((40, 3)) * (rng.random((40, 3)) < 0.6)
        C_S = rng.random((3, 50))
        a, c = rank1_nmf(jnp.asarray(A_S), jnp.asarray(C_S), n_iter=500)
        M = A_S @ C_S
        u, s, vt = np.linalg.svd(M)
        best = s[0] * np.outer(u[:, 0], vt[0])
        np.testing.assert_allclose(np.outer(a, c), best, atol=1e-8 * np.abs(best).max())
        assert np.isclose(np.linalg.norm(a), 1.0)


def test_split_neuron_is_merged_and_neighbours_are_not():
    rng = np.random.default_rng(1)
    H = W = 24
    T = 300
    a = _blob(H, W, 8, 8, 2.5)
    ramp = np.clip((10.0 - np.arange(W)) / 4.0, 0.0, 1.0)[None, :]  # the halves share a 3-px band
    left = a * ramp
    right = a - left
    c = _spikes(rng, T)
    other = _blob(H, W, 9, 12, 2.5)  # overlaps `a` but fires independently
    far = _blob(H, W, 19, 19, 2.5)  # fires with `a` but does not overlap it
    A = np.stack([left.ravel(), other.ravel(), right.ravel(), far.ravel()], axis=1)
    C = np.stack([c, _spikes(rng, T), c + 0.01 * rng.normal(size=T), c])
    assert merge_groups(A, C, thr=0.85) == [[0, 2]]
    with jax.enable_x64(True):
        res = merge_components(jnp.asarray(A), jnp.asarray(C), thr=0.85, n_iter=100)
    assert res.A.shape == (H * W, 3) and res.C.shape == (3, T)
    np.testing.assert_array_equal(res.source, [0, 1, 3])
    np.testing.assert_array_equal(res.merged, [True, False, False])
    a_hat = np.asarray(res.A[:, 0])
    cos = a_hat @ a.ravel() / np.linalg.norm(a)
    assert cos > 0.999
    assert np.corrcoef(np.asarray(res.C[0]), c)[0, 1] > 0.999
    # the joint contribution is preserved
    joint = np.outer(left.ravel(), C[0]) + np.outer(right.ravel(), C[2])
    err = np.linalg.norm(np.outer(a_hat, res.C[0]) - joint) / np.linalg.norm(joint)
    assert err < 0.01
    # unmerged components pass through unchanged
    np.testing.assert_array_equal(np.asarray(res.A[:, 1]), A[:, 1])


def test_nothing_to_merge_returns_inputs():
    rng = np.random.default_rng(2)
    A = np.stack([_blob(20, 20, 5, 5, 2).ravel(), _blob(20, 20, 14, 14, 2).ravel()], axis=1)
    C = np.stack([_spikes(rng, 200), _spikes(rng, 200)])
    res = merge_components(A, C)
    assert res.A is A and res.C is C and res.groups == ()


def test_degenerate_components():
    A = np.ones((10, 4))
    C = np.ones((4, 20))
    A[:, 1] = 0.0
    C[2] = 0.0
    A[3, 3] = np.nan
    np.testing.assert_array_equal(degenerate_components(A, C), [False, True, True, True])
    assert degenerate_components(np.zeros((5, 0)), np.zeros((0, 7))).shape == (0,)


def test_mixture_of_two_overlapping_neurons_is_flagged():
    rng = np.random.default_rng(3)
    H = W = 24
    T = 400
    a1, a2 = _blob(H, W, 10, 8, 2.5), _blob(H, W, 10, 14, 2.5)
    mid = _blob(H, W, 10, 11, 2.5)  # a start placed between the two
    c1, c2 = _spikes(rng, T), _spikes(rng, T)
    A = np.stack([a1.ravel(), mid.ravel(), a2.ravel(), _blob(H, W, 20, 20, 2).ravel()], axis=1)
    C = np.stack([c1, 0.4 * c1 + 0.6 * c2 + 0.01 * rng.normal(size=T), c2, _spikes(rng, T)])
    np.testing.assert_array_equal(mixture_components(A, C), [False, True, False, False])
    # two overlapping independent neurons are both kept, and thr=1 disables the test
    assert not mixture_components(A[:, [0, 2]], C[[0, 2]]).any()
    assert not mixture_components(A, C, thr=1.0).any()


def test_duplicate_components_marks_the_weaker_copy_of_one_footprint():
    """A footprint fitted twice (cosine 0.99, traces splitting its activity, correlation well below merge_thr) is a
    duplicate: the weaker copy is marked, the stronger kept; two overlapping neurons (cosine ~0.6) are not."""
    from jaxcnmf.merge import duplicate_components, trace_correlation

    rng = np.random.default_rng(5)
    H = W = 20
    yy, xx = np.mgrid[:H, :W]
    blob = lambda r, c: np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 8.0).ravel()  # noqa: E731
    a0 = blob(6, 6)
    a1 = a0 * (1 + 0.05 * rng.random(H * W))  # the same cell, a slightly different fit
    a2 = blob(6, 9)  # a neighbour overlapping it
    a3 = blob(15, 15)  # far away
    A = np.stack([a0, a1, a2, a3], axis=1)
    spikes = (rng.random((4, 500)) < 0.03) * rng.random((4, 500))
    C = np.stack([spikes[0] * 3, spikes[0][::-1] + spikes[1], spikes[2], spikes[3]])  # copy 1 weaker, unrelated
    cos = lambda i, j: A[:, i] @ A[:, j] / np.linalg.norm(A[:, i]) / np.linalg.norm(A[:, j])  # noqa: E731
    assert cos(0, 1) > 0.99 and 0.3 < cos(0, 2) < 0.8 and trace_correlation(C)[0, 1] < 0.5
    np.testing.assert_array_equal(duplicate_components(A, C), [False, True, False, False])
    np.testing.assert_array_equal(duplicate_components(A, C[[1, 0, 2, 3]]), [True, False, False, False])
    np.testing.assert_array_equal(duplicate_components(scipy.sparse.csc_matrix(A), C), [False, True, False, False])
    # three copies: the strongest stays
    A3 = np.stack([a0, a1, a0 * 0.5], axis=1)
    np.testing.assert_array_equal(duplicate_components(A3, np.stack([C[1], C[0], C[3]])), [True, False, True])
    assert not duplicate_components(A[:, [0, 2, 3]], C[[0, 2, 3]]).any()
    assert not duplicate_components(A[:, :1], C[:1]).any() and duplicate_components(A[:, :0], C[:0]).shape == (0,)
