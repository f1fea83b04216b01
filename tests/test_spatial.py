"""Tests of the spatial update: each pixel's noise-constrained problem against scipy (float64), HALS against NNLS,
support inside the search areas, gradients against finite differences, search areas and footprint clean-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize, nnls
from scipy import ndimage

from jaxcnmf.errors import ParameterError
from jaxcnmf.spatial import _candidates, _solve_all, cleanup_footprints, search_areas, update_spatial

H, W, T, K = 6, 6, 60, 3


@pytest.fixture(scope="module")
def tiny():
    """Three overlapping blobs on a 6x6 field, 60 frames, background with a fluctuating trace, noise sd 0.5."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:H, :W]
    A = np.stack([np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 2.0).ravel() for r, c in [(1, 1), (2, 3), (4, 4)]], 1)
    A[A < 0.1] = 0
    C = np.maximum(rng.standard_normal((K, T)), 0) * 3
    b = np.full((H * W, 1), 5.0)
    f = 1.0 + 0.1 * rng.random((1, T))
    sn = np.full(H * W, 0.5)
    Y = A @ C + b @ f + sn[:, None] * rng.standard_normal((H * W, T))
    return Y, A, C, b, f, sn


def _reference_pixel(y, Fc, f, budget):
    """Exact per-pixel solution: NNLS if it misses the budget, else min sum(a) s.t. residual <= budget (SLSQP)."""
    F = np.vstack([Fc, f])
    n = Fc.shape[0]
    x_ls, _ = nnls(F.T, y)

    def res(x):
        return np.sum((y - x @ F) ** 2)

    if res(x_ls) >= budget:
        return x_ls
    w = np.r_[np.ones(n), np.zeros(f.shape[0])]
    cons = {"type": "ineq", "fun": lambda x: budget - res(x), "jac": lambda x: 2 * (y - x @ F) @ F.T}
    out = minimize(lambda x: w @ x, x_ls, jac=lambda x: w, bounds=[(0, None)] * F.shape[0], constraints=[cons],
                   method="SLSQP", options=dict(ftol=1e-12, maxiter=500))
    return out.x


def test_constrained_update_matches_exact_solver(tiny):
    Y, A, C, b, f, sn = tiny
    search = A > 0
    with jax.enable_x64(True):
        A1, b1 = update_spatial(Y, 0.5 * A, C, b, f, sn, search=search, n_iter=50, n_lambda=60)
    A1, b1 = np.asarray(A1), np.asarray(b1)
    n_binding = 0
    for i in range(H * W):
        s = np.flatnonzero(search[i])
        ref = _reference_pixel(Y[i], C[s], f, sn[i] ** 2 * T)
        obj_ref, obj = ref[: len(s)].sum(), A1[i, s].sum()
        assert abs(obj - obj_ref) <= 1e-3 * max(1.0, obj_ref), (i, obj, obj_ref)
        resid = np.sum((Y[i] - A1[i, s] @ C[s] - b1[i] @ f) ** 2)
        resid_ls = np.sum((Y[i] - ref @ np.vstack([C[s], f])) ** 2)
        assert resid <= max(sn[i] ** 2 * T, resid_ls) * (1 + 1e-6)
        n_binding += resid_ls < sn[i] ** 2 * T * (1 - 1e-6) or np.isclose(resid_ls, sn[i] ** 2 * T)
    assert n_binding >= 5  # the noise constraint binds on a fair share of the pixels (the test checks that case)
    assert np.all(A1[~search] == 0) and A1.min() >= 0 and b1.min() >= 0


def test_default_iterations_in_float32_are_close_to_exact(tiny):
    Y, A, C, b, f, sn = tiny
    search = A > 0
    A1, _ = update_spatial(Y.astype(np.float32), 0.5 * A, C, b, f, sn, search=search)
    A1 = np.asarray(A1, np.float64)
    for i in range(H * W):
        s = np.flatnonzero(search[i])
        obj_ref = _reference_pixel(Y[i], C[s], f, sn[i] ** 2 * T)[: len(s)].sum()
        assert abs(A1[i, s].sum() - obj_ref) <= 1e-2 * max(1.0, obj_ref), (i, A1[i, s].sum(), obj_ref)


def test_hals_matches_nnls(tiny):
    Y, A, C, b, f, sn = tiny
    search = A > 0
    with jax.enable_x64(True):
        A1, b1 = update_spatial(Y, A, C, b, f, sn, search=search, method="hals", n_iter=300)
    for i in range(H * W):
        s = np.flatnonzero(search[i])
        x, _ = nnls(np.vstack([C[s], f]).T, Y[i])
        np.testing.assert_allclose(np.r_[np.asarray(A1)[i, s], np.asarray(b1)[i]], x, rtol=1e-6, atol=1e-8)


def test_gradient_matches_finite_differences(tiny):
    Y, A, C, b, f, sn = tiny
    search = A > 0
    rng = np.random.default_rng(5)
    Wa, Wb = rng.standard_normal((H * W, K)), rng.standard_normal((H * W, 1))
    with jax.enable_x64(True):

        def loss(Yr):
            A1, b1 = update_spatial(Yr, 0.5 * A, C, b, f, sn, search=search, n_iter=50, n_lambda=60)
            return jnp.sum(A1 * Wa) + jnp.sum(b1 * Wb)

        grad = np.asarray(jax.grad(loss)(jnp.asarray(Y)))
        assert np.isfinite(grad).all() and np.abs(grad).max() > 0
        eps = 1e-6
        # pixels 5 and 30 lie outside every search area (solved as background-only problems, padded rows)
        for i, t in [(7, 3), (14, 10), (20, 5), (0, 0), (35, 59), (9, 30), (21, 44), (5, 12), (30, 40)]:
            E = np.zeros_like(Y)
            E[i, t] = eps
            fd = (float(loss(jnp.asarray(Y + E))) - float(loss(jnp.asarray(Y - E)))) / (2 * eps)
            assert abs(grad[i, t] - fd) <= 1e-5 * max(1.0, abs(fd)), (i, t, grad[i, t], fd)


def test_float32_movie_with_large_baseline_keeps_support_in_search_area():
    rng = np.random.default_rng(2)
    h = w = 24
    yy, xx = np.mgrid[:h, :w]
    centres = [(6, 6), (8, 11), (17, 16)]
    A = np.stack([np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 4.0).ravel() for r, c in centres], 1)
    A[A < 0.05] = 0
    T_ = 300
    C = np.maximum(rng.standard_normal((3, T_)) - 1, 0) * 50
    Y = (A @ C + 1000.0 + rng.standard_normal((h * w, T_))).astype(np.float32)
    b = np.full((h * w, 1), 1000.0, np.float32)
    f = np.ones((1, T_), np.float32)
    A0 = np.roll(A.reshape(h, w, 3), 1, axis=0).reshape(h * w, 3)  # a displaced start: the update must move it back
    area = np.asarray(search_areas(A0, (h, w), 3.0))
    A1, b1 = update_spatial(Y, A0, C, b, f, np.ones(h * w), radius=3.0, shape=(h, w))
    A1 = np.asarray(A1)
    assert A1.dtype == np.float32
    assert np.all(A1[~area] == 0)
    for k in range(3):
        assert np.corrcoef(A1[:, k], A[:, k])[0, 1] > 0.95
    assert abs(float(np.median(b1)) - 1000.0) < 1.0


def test_pixels_outside_every_search_area_are_solved_as_the_all_pixel_problem(tiny):
    """update_spatial solves the pixels with candidates and those without (background terms only) as two padded
    sets; the result must be the one-set solve of every pixel with all m candidate slots, and the padding sizes
    grow by at most 19 %."""
    from jaxcnmf.spatial import pixel_bucket, spatial_statistics
    from jaxcnmf.spatial import candidate_statistics

    Y, A, C, b, f, sn = tiny
    search = A > 0
    assert (~search.any(axis=1)).sum() >= 5
    with jax.enable_x64(True):
        A1, b1 = update_spatial(Y, 0.5 * A, C, b, f, sn, search=search)
        idx, valid, slots = _candidates(search)
        Q, G, rr = spatial_statistics(jnp.asarray(Y), jnp.asarray(C), jnp.asarray(b), jnp.asarray(f))
        full = np.concatenate([idx, np.broadcast_to(A.shape[1] + np.arange(b.shape[1]), (idx.shape[0], b.shape[1]))], 1)
        qs = np.where(np.concatenate([valid, np.ones((idx.shape[0], b.shape[1]), bool)], 1),
                      np.take_along_axis(np.asarray(Q), full, axis=1), 0)
        # the candidates' entries of the dense product, without it
        qs2, G2, rr2 = candidate_statistics(jnp.asarray(Y), jnp.asarray(C), jnp.asarray(b), jnp.asarray(f), search,
                                            idx, valid, slots)
        np.testing.assert_allclose(np.asarray(qs2), qs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(G2), np.asarray(G), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(rr2), np.asarray(rr), rtol=1e-12)
        A2, b2 = _solve_all(jnp.asarray(qs), G, rr, jnp.asarray(sn * sn * T), jnp.asarray(idx), jnp.asarray(valid),
                            jnp.asarray(0.5 * A), jnp.asarray(b), n_sweeps=5, n_lambda=10, constrained=True)
    np.testing.assert_allclose(np.asarray(A1), np.asarray(A2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(b1), np.asarray(b2), rtol=1e-12, atol=1e-12)
    sizes = [pixel_bucket(n) for n in range(1, 300000, 331)]
    assert all(s >= n for s, n in zip(sizes, range(1, 300000, 331)))
    assert all(s <= max(256, 1.19 * n + 8) for s, n in zip(sizes, range(1, 300000, 331)))
    assert len(set(pixel_bucket(n) for n in range(20000, 40000))) <= 5  # few compiled shapes


def test_solve_compiles_once_per_shape(tiny):
    Y, A, C, b, f, sn = tiny
    from jaxcnmf.spatial import _solve_rows

    update_spatial(Y, A, C, b, f, sn, radius=1.5, shape=(H, W))
    n, n_rows = _solve_all._cache_size(), _solve_rows._cache_size()
    update_spatial(Y * 1.1, A * 0.9, C, b, f, sn, radius=1.5, shape=(H, W))
    assert _solve_all._cache_size() == n and _solve_rows._cache_size() == n_rows


def test_search_areas_disk_and_shape_following():
    h = w = 21
    a = np.zeros((h, w))
    a[10, 10] = 1.0
    line = np.zeros((h, w))
    line[10, 2:19] = 1.0
    A = np.stack([a.ravel(), line.ravel(), np.zeros(h * w)], 1)
    disk = np.asarray(search_areas(A, (h, w), 3.0)).reshape(h, w, 3)
    yy, xx = np.mgrid[:h, :w]
    np.testing.assert_array_equal(disk[..., 0], (yy - 10) ** 2 + (xx - 10) ** 2 <= 9)
    assert not disk[..., 2].any()  # empty footprint, empty area
    thin = np.asarray(search_areas(A, (h, w), 3.0, compact=False)).reshape(h, w, 3)[..., 1]
    assert thin[10, 2:19].all() and thin[8:13, 5].all() and not thin[7, 5] and not thin[13, 5]
    with pytest.raises(ParameterError):
        search_areas(A[:-1], (h, w), 3.0)


def test_search_areas_on_crops_equal_whole_image_dilation():
    # search_areas dilates each support on a crop around it (speed); the reference dilates the whole image, with
    # footprints touching every edge of the field and specks far from the blob
    rng = np.random.default_rng(5)
    H, W, K = 30, 26, 12
    yy, xx = np.mgrid[:H, :W]
    A = np.zeros((H * W, K), np.float32)
    centres = [(0, 0), (H - 1, W - 1), (0, W - 1), (H - 1, 3), (15, 0)] + [tuple(rng.integers(0, (H, W))) for _ in
                                                                           range(K - 5)]
    for k, (r, c) in enumerate(centres):
        blob = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 5.0) * (1 + 0.3 * rng.random((H, W)))
        A[:, k] = (blob + 0.5 * (rng.random((H, W)) < 0.02)).ravel()
    A[:, 6] = 0.0
    for compact, radius in ((True, 3.0), (True, 2.5), (False, 3.0), (False, 5.0)):
        if compact:
            element, n = (yy[:7, :7] - 3) ** 2 + (xx[:7, :7] - 3) ** 2 <= radius**2 + 1e-9, 1
            element = element[3 - int(radius) : 4 + int(radius), 3 - int(radius) : 4 + int(radius)]
        else:
            element, n = ndimage.generate_binary_structure(2, 1), max(1, round(radius / 2))
        got = np.asarray(search_areas(A, (H, W), radius, compact=compact)).reshape(H, W, K)
        for k in range(K):
            img = A[:, k].reshape(H, W)
            ref = ndimage.binary_dilation(img > np.float32(0.1) * img.max(), structure=element, iterations=n) \
                if img.max() > 0 else np.zeros((H, W), bool)
            np.testing.assert_array_equal(got[..., k], ref, err_msg=f"component {k}, compact={compact}")


def test_cleanup_keeps_main_blob_and_normalises():
    h = w = 20
    yy, xx = np.mgrid[:h, :w]
    main = np.exp(-((yy - 6) ** 2 + (xx - 6) ** 2) / 6.0)
    main[main < 0.05] = 0
    speck = np.zeros((h, w))
    speck[15:17, 15:17] = 0.3  # a separate, weaker piece
    a = main + speck
    A = np.stack([a.ravel(), np.zeros(h * w)], 1)
    A_clean, norms = cleanup_footprints(A, (h, w))
    A_clean = np.asarray(A_clean)
    assert np.all(A_clean[speck.ravel() > 0, 0] == 0)
    np.testing.assert_allclose(A_clean[:, 0] * float(norms[0]), main.ravel(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(A_clean[:, 0]), 1.0, rtol=1e-6)
    assert float(norms[1]) == 0 and not A_clean[:, 1].any()
    kept, _ = cleanup_footprints(A, (h, w), connected=False)  # dendrites: every piece stays
    assert np.all(np.asarray(kept)[speck.ravel() > 0, 0] > 0)


def _cleanup_reference(A, shape, median, min_weight=0.01, connected=True):
    """cleanup_footprints written out on the whole image, one column at a time, in float64."""
    H, W = shape
    out, norms = np.zeros(A.shape), np.zeros(A.shape[1])
    for k in range(A.shape[1]):
        a = np.maximum(np.asarray(A[:, k], np.float64), 0).reshape(H, W)
        a[a < min_weight * a.max(initial=0)] = 0
        a = ndimage.median_filter(a, size=median, mode="constant", cval=0.0)
        a[a < min_weight * a.max(initial=0)] = 0
        labels, n = ndimage.label(a > 0, structure=np.ones((3, 3)))
        if n and connected:
            energy = ndimage.sum_labels(a**2, labels, np.arange(1, n + 1))
            a = np.where(labels == 1 + int(np.argmax(energy)), a, 0)
        norms[k] = np.sqrt((a**2).sum())
        out[:, k] = (a / norms[k] if norms[k] > 0 else a).ravel()
    return out, norms


def test_cleanup_median_equals_whole_image_reference():
    """The median filter runs on each footprint's crop (widened by its reach): the same result as on the whole image
    with zeros outside the field, for footprints inside, on the edge and in a corner of the field."""
    rng = np.random.default_rng(7)
    H, W = 21, 17
    yy, xx = np.mgrid[:H, :W]
    centres = [(10, 8), (0, 8), (20, 16), (5, 0), (13, 12)]
    A = np.zeros((H * W, len(centres) + 1), np.float32)
    for k, (r, c) in enumerate(centres):
        blob = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 8.0)
        speckle = (rng.random((H, W)) < 0.08) * rng.random((H, W))  # isolated pixels, some far from the blob
        A[:, k] = (np.where(blob > 0.05, blob * (0.5 + rng.random((H, W))), 0) + 0.6 * speckle).ravel()
    ref, n_ref = _cleanup_reference(A, (H, W), 3)  # the last column is empty
    got, n = cleanup_footprints(A, (H, W), median=3)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(n), n_ref, rtol=1e-6)
    got1, n1 = cleanup_footprints(A, (H, W))  # no median: the crop is the kept weights' box itself
    ref1, n_ref1 = _cleanup_reference(A, (H, W), 1)
    np.testing.assert_allclose(np.asarray(got1), ref1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(n1), n_ref1, rtol=1e-6)
    got5, _ = cleanup_footprints(A, (H, W), median=5)
    np.testing.assert_allclose(np.asarray(got5), _cleanup_reference(A, (H, W), 5)[0], rtol=1e-6, atol=1e-7)


def test_cleanup_median_keeps_a_speckled_blob_whole():
    """A dim cell's least-squares footprint is its blob plus noise clipped at zero, with isolated pixels around it
    (many pieces above 20 % of its peak, which is how contours, masks and matching see it); with the median it is
    one blob covering the cell, and nothing away from it survives. (On neurofinder_tr the median number of such
    pieces per fitted footprint went from 6 to 1: `Params.footprint_median`.)"""
    rng = np.random.default_rng(3)
    H = W = 25
    yy, xx = np.mgrid[:H, :W]
    disc = np.hypot(yy - 12, xx - 12) <= 4.5
    near = ndimage.binary_dilation(disc)
    noise = rng.standard_normal((H, W))
    a = np.maximum(np.where(disc, 1.0, 0.0) + 0.8 * noise, 0) * near  # the cell, noisy pixels clipped at zero
    a = a + 0.8 * (~near & (rng.random((H, W)) < 0.05))  # isolated noise pixels elsewhere in the window
    A = a.reshape(-1, 1).astype(np.float32)
    pieces = lambda x: ndimage.label(np.asarray(x).reshape(H, W) > 0.2 * np.max(x), np.ones((3, 3)))[1]  # noqa: E731
    assert pieces(a) > 5
    smooth = np.asarray(cleanup_footprints(A, (H, W), median=3)[0]).reshape(H, W) > 0
    assert pieces(smooth) == 1
    assert (smooth & ~near).sum() == 0  # no noise pixel far from the cell survives
    assert (smooth & disc).sum() >= 0.9 * disc.sum()


def test_bad_arguments():
    Y = np.zeros((16, 10))
    with pytest.raises(ParameterError, match="method"):
        update_spatial(Y, np.zeros((16, 1)), np.zeros((1, 10)), np.zeros((16, 1)), np.ones((1, 10)), np.ones(16),
                       radius=1.0, shape=(4, 4), method="magic")
    with pytest.raises(ParameterError, match="search"):
        update_spatial(Y, np.zeros((16, 1)), np.zeros((1, 10)), np.zeros((16, 1)), np.ones((1, 10)), np.ones(16))
    with pytest.raises(ParameterError, match="sn"):
        update_spatial(Y, np.zeros((16, 1)), np.zeros((1, 10)), np.zeros((16, 1)), np.ones((1, 10)), np.ones(15),
                       radius=1.0, shape=(4, 4))
    for bad in (0, 2, -1, 1.5, True):
        with pytest.raises(ParameterError, match="median"):
            cleanup_footprints(np.ones((16, 1)), (4, 4), median=bad)


def test_cropped_cleanup_and_candidates_equal_their_references():
    """cleanup_footprints works on each footprint's crop: the same as on the whole image (search_areas: the test
    above). _candidates lists each pixel's candidate components from the (pixel, component) pairs."""
    rng = np.random.default_rng(4)
    H, W, K = 23, 19, 30
    yy, xx = np.mgrid[:H, :W]
    A = np.zeros((H * W, K), np.float32)
    for k in range(K):
        r, c = rng.integers(0, H), rng.integers(0, W)
        blob = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 6.0) * (1 + 0.3 * rng.random((H, W)))
        A[:, k] = (blob + 0.5 * (rng.random((H, W)) < 0.03)).ravel()  # specks: pieces the clean-up drops
    A[:, 3] = 0.0
    for connected in (True, False):
        a, n = cleanup_footprints(A, (H, W), connected=connected)
        a_ref, n_ref = _cleanup_reference(A, (H, W), 1, connected=connected)
        np.testing.assert_allclose(np.asarray(a), a_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(n), n_ref, rtol=1e-6)
    search = np.asarray(search_areas(A, (H, W), 3.0))
    idx, valid, slots = _candidates(search)
    for i in range(H * W):  # each pixel's candidates: the components whose area holds it, in increasing order
        np.testing.assert_array_equal(idx[i][valid[i]], np.flatnonzero(search[i]))
        assert not valid[i, int(search[i].sum()):].any()
        for k, j in zip(idx[i][valid[i]], slots[i][valid[i]]):  # i's place in component k's pixel list
            assert j == np.flatnonzero(search[:, k]).tolist().index(i)
    assert valid.sum() == search.sum() and idx.shape[1] % 4 == 0
