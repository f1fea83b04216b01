"""The out-of-core, banded refinement: each banded stage against the in-memory stage of `fit` it replaces, on a small
movie cut into uneven bands of rows and read in uneven chunks of frames; sparse footprint helpers against the dense
ones; binned patch fits of a long movie give a full-rate result."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from jaxcnmf.io import open_movie
from jaxcnmf.patches import Streamer, read_window
from jaxcnmf.refine import (
    band_rows,
    cleanup_sparse,
    noise_banded,
    project_banded,
    quality_banded,
    sparse_search_areas,
    spatial_banded,
    temporal_banded,
)

H, W, T = 30, 26, 90
BAND = 7 * W  # bands of 7 rows: 7, 7, 7, 7, 2


@pytest.fixture(scope="module")
def problem():
    """A movie with 6 blob neurons (two overlapping, two on band borders), its model, and a perturbed start."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    centres = [(5, 6), (7, 9), (14, 13), (21, 5), (20, 20), (27, 14)]
    A = np.stack([np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 6.0).ravel() for r, c in centres], axis=1)
    A[A < 0.05] = 0
    A /= np.linalg.norm(A, axis=0)
    spikes = rng.random((len(centres), T)) < 0.05
    C = np.zeros((len(centres), T))
    for t in range(T):
        C[:, t] = (0.9 * C[:, t - 1] if t else 0) + 8 * spikes[:, t]
    b = rng.uniform(1, 2, (H * W, 1))
    f = 10 + np.sin(np.arange(T) / 9.0)[None]
    sn = rng.uniform(0.3, 0.6, H * W)
    Y = A @ C + b @ f + sn[:, None] * rng.normal(size=(H * W, T))
    movie = np.ascontiguousarray(Y.T.reshape(T, H, W)).astype(np.float32)
    A0 = np.where(A > 0, A * rng.uniform(0.7, 1.3, A.shape), 0).astype(np.float32)
    C0 = (C * 1.1 + 0.2).astype(np.float32)
    return movie, A0, C0, b.astype(np.float32), f.astype(np.float32), sn.astype(np.float32)


def _stream(movie):
    return Streamer(open_movie(movie), chunk_frames=23, band_pixels=BAND)  # 90 frames: 23, 23, 23, 21


def _params(**kw):
    from jaxcnmf.fit import make_params

    return make_params(2.0, fps=30.0, **kw)


def test_bands_cover_the_field():
    bands = band_rows(H, W, BAND)
    assert bands[0] == (0, 7) and bands[-1] == (28, 30)
    assert [r0 for r0, _ in bands[1:]] == [r1 for _, r1 in bands[:-1]]
    assert band_rows(5, 1000, 10) == [(i, i + 1) for i in range(5)]  # at least one row per band


@pytest.mark.parametrize("compact,threshold", [(True, 0.1), (True, 0.0), (False, 0.1)])
def test_sparse_search_areas_equal_dense(problem, compact, threshold):
    from jaxcnmf.spatial import search_areas

    A = problem[1]
    dense = np.asarray(search_areas(A, (H, W), 2.5, threshold=threshold, compact=compact))
    sparse = sparse_search_areas(sp.csc_matrix(A), (H, W), 2.5, threshold=threshold, compact=compact).toarray()
    assert dense.any() and not dense.all()
    np.testing.assert_array_equal(sparse, dense)


def test_sparse_cleanup_and_centres_equal_dense(problem):
    from jaxcnmf.fit import center_of_mass
    from jaxcnmf.spatial import cleanup_footprints

    A = problem[1].copy()
    A[0, 2] = 0.3  # a detached speck: the clean-up drops it
    A[:, 4] = 0  # an empty column
    dense, n_dense = cleanup_footprints(A, (H, W))
    sparse, n_sparse = cleanup_sparse(sp.csc_matrix(A), (H, W))
    assert sparse.toarray()[0, 2] == 0 and n_sparse[4] == 0
    np.testing.assert_allclose(sparse.toarray(), np.asarray(dense), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(n_sparse, np.asarray(n_dense), rtol=1e-6)
    np.testing.assert_allclose(center_of_mass(sparse, (H, W)), center_of_mass(np.asarray(dense), (H, W)),
                               rtol=1e-6)
    dense3, n_dense3 = cleanup_footprints(A, (H, W), median=3)  # the median filter reaches past the support
    sparse3, n_sparse3 = cleanup_sparse(sp.csc_matrix(A), (H, W), median=3)
    np.testing.assert_allclose(sparse3.toarray(), np.asarray(dense3), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(n_sparse3, np.asarray(n_dense3), rtol=1e-6)


@pytest.mark.parametrize("method", ["hals", "constrained"])
def test_banded_spatial_update_equals_whole_field(problem, method):
    from jaxcnmf.spatial import update_spatial

    movie, A0, C0, b, f, sn = problem
    Yr = movie.reshape(T, H * W).T
    A_ref, b_ref = update_spatial(Yr, A0, C0, b, f, sn, radius=2.0, shape=(H, W), method=method)
    A_b, b_b = spatial_banded(_stream(movie), band_rows(H, W, BAND), sp.csc_matrix(A0), C0, b, f, sn, radius=2.0,
                              shape=(H, W), method=method, compact=True)
    A_ref = np.asarray(A_ref)
    assert np.abs(A_ref - A0).max() > 0.01  # the update moved the footprints
    scale = np.abs(A_ref).max()
    np.testing.assert_allclose(A_b.toarray(), A_ref, atol=2e-3 * scale)
    np.testing.assert_allclose(b_b, np.asarray(b_ref), rtol=2e-3, atol=2e-3 * np.abs(b_ref).max())


def test_banded_temporal_update_equals_whole_field(problem):
    from jaxcnmf.temporal import update_temporal

    movie, A0, C0, b, f, sn = problem
    Yr = movie.reshape(T, H * W).T
    stream, bands = _stream(movie), band_rows(H, W, BAND)
    M = np.concatenate([A0, b], axis=1)
    np.testing.assert_allclose(project_banded(stream, bands, sp.csc_matrix(A0), b), M.T @ Yr, rtol=1e-4,
                               atol=1e-3 * np.abs(M.T @ Yr).max())
    prm = _params(p=1)
    ref = update_temporal(Yr, A0, C0, b, f, p=1, n_sweeps=prm.temporal_sweeps)
    out = temporal_banded(stream, bands, sp.csc_matrix(A0), C0, b, f, prm)
    for name in ("C", "S", "f"):
        x, y = np.asarray(getattr(out, name)), np.asarray(getattr(ref, name))
        np.testing.assert_allclose(x, y, atol=5e-3 * np.abs(y).max(), err_msg=name)


def test_banded_quality_equals_whole_field(problem):
    from jaxcnmf.quality import evaluate_components
    from jaxcnmf.temporal import update_temporal

    movie, A0, C0, b, f, sn = problem
    Yr = movie.reshape(T, H * W).T
    tr = update_temporal(Yr, A0, C0, b, f, p=1)
    prm = _params()
    ref = evaluate_components(Yr, A0, tr.C, b, tr.f, sn, tr.YrA, fps=prm.fps, min_snr=prm.min_snr,
                              rval_thr=prm.rval_thr, shape=(H, W), radius=2.0)
    snr, r, acc = quality_banded(_stream(movie), band_rows(H, W, BAND), sp.csc_matrix(A0), tr, b, tr.f, sn, prm,
                                 (H, W))
    np.testing.assert_allclose(snr, np.asarray(ref.snr), rtol=1e-4)
    np.testing.assert_allclose(r, np.asarray(ref.r_value), atol=1e-4)
    np.testing.assert_array_equal(acc, np.asarray(ref.accepted))


def test_banded_noise_equals_whole_movie(problem):
    from jaxcnmf.noise import estimate_noise_movie

    movie = problem[0]
    ref = estimate_noise_movie(movie, chunk_frames=40)  # windows 0-40, 40-80 and 50-90 (weighted)
    out = noise_banded(_stream(movie), chunk_frames=40, block=40 * 3 * W)  # bands of 3 rows
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_read_window_bins_frames(problem):
    movie = problem[0]
    box = (3, 20, 2, 11)
    out = read_window(open_movie(movie), box, chunk_frames=17, bin=4)  # chunks rounded to whole bins
    ref = movie[:88, 3:20, 2:11].reshape(22, 4, 17, 9).mean(axis=1)
    assert out.shape == (22, 17, 9)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_long_movie_patch_fits_on_bins_and_result_at_full_rate():
    """Patch fits capped at 100 frames see the 300-frame movie in bins of 3; the result is at the movie's rate and
    as accurate as an unbinned patch run."""
    from _scale_movies import FPS, OVERLAP, PATCH, RADIUS, planted_movie

    from jaxcnmf.metrics import score_result
    from jaxcnmf.patches import fit_patches, plan_patches

    movie, truth = planted_movie(seed=4, n_frames=300)
    kw = dict(fps=FPS, patch_size=PATCH, overlap=OVERLAP)
    plan = plan_patches(movie, RADIUS, max_fit_frames=100, **kw)
    assert plan.jobs[0].bin == 3 and plan.jobs[0].params["fps"] == pytest.approx(FPS / 3)
    binned = fit_patches(movie, RADIUS, max_fit_frames=100, **kw)
    full = fit_patches(movie, RADIUS, **kw)
    assert binned.C.shape == (binned.n_components, 300) and binned.f.shape[1] == 300
    s_b, s_f = score_result(binned, truth), score_result(full, truth)
    assert s_b["f1"] >= s_f["f1"] - 0.01 and s_b["f1"] >= 0.9
    assert s_b["calcium_corr_median"] >= s_f["calcium_corr_median"] - 0.01


def test_overlap_graph_of_sparse_footprints_equals_dense(problem):
    from jaxcnmf.temporal import overlap_graph

    A = problem[1]
    dense = overlap_graph(A)
    assert dense[0, 1] and not dense.all()  # the first two blobs overlap, not every pair does
    np.testing.assert_array_equal(overlap_graph(sp.csc_matrix(A)), dense)
