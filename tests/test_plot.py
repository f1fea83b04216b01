"""Figures of a fit: the correlation image against an exact float64 reference, and each figure drawing what it says."""

from __future__ import annotations

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxcnmf import plot  # noqa: E402
from jaxcnmf.errors import MovieError, ParameterError  # noqa: E402

from _plot_fixtures import small_fit  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fitted():
    return small_fit()


def reference_correlation_image(movie):
    """Mean Pearson correlation with the in-image 8-neighbours, pixel pair by pixel pair with np.corrcoef (float64)."""
    Y = np.asarray(movie, np.float64)
    T, H, W = Y.shape
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            rs = []
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i + di, j + dj
                    if (di or dj) and 0 <= ii < H and 0 <= jj < W:
                        a, b = Y[:, i, j], Y[:, ii, jj]
                        rs.append(0.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a, b)[0, 1])
            out[i, j] = np.mean(rs)
    return out


def correlated_movie(T=60, H=7, W=9, seed=1):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=(T, 1, 1))
    weight = rng.uniform(0, 2, (1, H, W))
    movie = 1000.0 + weight * common + rng.normal(size=(T, H, W))  # large offset: tests the shifted sums
    movie[:, 3, 4] = 5.0  # a dead pixel: correlation 0 with everyone
    return movie.astype(np.float32)


def test_local_correlation_matches_exact_reference_for_any_chunking(tmp_path):
    movie = correlated_movie()
    ref = reference_correlation_image(movie)
    for chunk in (1, 7, 1000):
        np.testing.assert_allclose(plot.local_correlation_image(movie, chunk_frames=chunk), ref, atol=2e-5)
    np.save(tmp_path / "m.npy", movie)  # streamed from a file as well
    np.testing.assert_allclose(plot.local_correlation_image(str(tmp_path / "m.npy"), chunk_frames=8), ref, atol=2e-5)
    assert abs(ref).max() > 0.2  # the check is not vacuous


def test_mean_image_streams_exactly():
    movie = correlated_movie()
    np.testing.assert_allclose(plot.mean_image(movie, chunk_frames=11), movie.astype(np.float64).mean(0), rtol=1e-6)


def test_contours_lie_on_the_closed_form_level_set(fitted):
    result, movie, sigma = fitted
    level = 0.3
    fig = plot.plot_contours(result, background="footprints", level=level)
    ax = fig.axes[0]
    sets = [c for c in ax.collections if hasattr(c, "levels")]
    assert len(sets) == result.n_components
    radius = sigma * np.sqrt(2 * np.log(1 / level))  # a Gaussian's level set at `level` of its max is this circle
    for k, cs in enumerate(sets):
        verts = np.concatenate([p.vertices for p in cs.get_paths()])
        cy, cx = np.asarray(result.centers[k])
        dist = np.hypot(verts[:, 0] - cx, verts[:, 1] - cy)  # contour vertices are (x=col, y=row)
        np.testing.assert_allclose(dist, radius, atol=0.15)
    labels = sorted(int(t.get_text()) for t in ax.texts)
    assert labels == list(range(result.n_components))
    colors = {tuple(np.round(cs.get_edgecolor()[0], 3)) for cs in sets}
    assert len(colors) == result.n_components
    dashed = [cs.get_linestyle()[0][1] is not None for cs in sets]  # (offset, dash pattern); solid has none
    assert dashed == [not a for a in np.asarray(result.accepted)]


def test_contours_over_summary_images_and_truth(fitted):
    result, movie, _ = fitted
    truth = np.asarray(result.A)[:2]
    fig = plot.plot_contours(result, movie=movie, truth_A=truth)  # default: the correlation image
    img = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(img, plot.local_correlation_image(movie), atol=1e-6)
    assert len([c for c in fig.axes[0].collections if hasattr(c, "levels")]) == result.n_components + 2
    fig = plot.plot_contours(result, background="mean", movie=movie, accepted_only=True)
    assert len(fig.axes[0].texts) == int(np.sum(result.accepted))
    fig, ax = plt.subplots()
    assert plot.plot_contours(result, background=np.ones(result.sn.shape), ax=ax) is fig


def test_contour_and_residual_errors(fitted):
    result, movie, _ = fitted
    with pytest.raises(ParameterError, match="needs the movie"):
        plot.plot_contours(result, background="corr")
    with pytest.raises(ParameterError, match="background='max'"):
        plot.plot_contours(result, background="max")
    with pytest.raises(ParameterError, match="image shape"):
        plot.plot_contours(result, background=np.ones((3, 3)))
    with pytest.raises(MovieError, match="differs from the result"):
        plot.plot_residual(result, movie[:, :, :-1])
    with pytest.raises(ParameterError, match="expected a jaxcnmf Result"):
        plot.plot_traces({"C": 1})


def test_traces_show_raw_denoised_and_spikes(fitted):
    result, _, _ = fitted
    fig = plot.plot_traces(result, idx=[2, 0])
    assert len(fig.axes) == 4
    for row, k in enumerate([2, 0]):
        ax, sx = fig.axes[2 * row], fig.axes[2 * row + 1]
        raw, den = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
        np.testing.assert_allclose(raw, np.asarray(result.C[k] + result.YrA[k]), rtol=1e-6)
        np.testing.assert_allclose(den, np.asarray(result.C[k]), rtol=1e-6)
        np.testing.assert_allclose(ax.lines[0].get_xdata(), np.arange(result.C.shape[1]) / 20.0)  # params fps
        segs = sx.collections[0].get_segments()
        S = np.asarray(result.S[k])
        assert len(segs) == int(np.sum(S > 0))
        np.testing.assert_allclose([s[1, 1] for s in segs], S[S > 0], rtol=1e-6)
    default = plot.plot_traces(result, fps=None)
    assert len(default.axes) == 2 * int(np.sum(result.accepted))  # accepted components by default
    with pytest.raises(ParameterError, match="idx"):
        plot.plot_traces(result, idx=[7])


def test_quality_scatter_and_thresholds(fitted):
    result, _, _ = fitted
    fig = plot.plot_quality(result)
    ax = fig.axes[0]
    rejected, accepted = (c.get_offsets() for c in ax.collections[:2])
    acc = np.asarray(result.accepted)
    np.testing.assert_allclose(np.asarray(accepted)[:, 0], np.asarray(result.r_value)[acc])
    np.testing.assert_allclose(np.asarray(rejected)[:, 1], np.asarray(result.snr)[~acc])
    hlines = [ln.get_ydata()[0] for ln in ax.lines if ln.get_ydata()[0] == ln.get_ydata()[-1]]
    vlines = [ln.get_xdata()[0] for ln in ax.lines if ln.get_xdata()[0] == ln.get_xdata()[-1]]
    assert 2.5 in hlines and 0.8 in vlines  # from result.params
    assert 1.5 in hlines and 0.5 in vlines  # the rule's floors
    bare = type(result)(**{k: getattr(result, k) for k in ("A", "C", "S", "b", "f", "sn", "g", "YrA")})
    with pytest.raises(ParameterError, match="no quality metrics"):
        plot.plot_quality(bare)


def test_background_shows_b_and_f(fitted):
    result, _, _ = fitted
    fig = plot.plot_background(result)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.asarray(result.b[0]))
    traces = [ax for ax in fig.axes if ax.lines]
    np.testing.assert_allclose(traces[0].lines[0].get_ydata(), np.asarray(result.f[0]))


def test_residual_stats_match_direct_computation(fitted):
    result, movie, _ = fitted
    st = plot.residual_stats(result, movie, chunk_frames=13)
    Y = movie.astype(np.float64)
    R = Y - np.einsum("khw,kt->thw", np.asarray(result.A, np.float64), np.asarray(result.C, np.float64))
    R -= np.einsum("khw,kt->thw", np.asarray(result.b, np.float64), np.asarray(result.f, np.float64))
    np.testing.assert_allclose(st["mean"], R.mean(0), atol=1e-4)
    np.testing.assert_allclose(st["energy"], (R**2).mean(0), rtol=1e-4)
    # the movie is exactly model + N(0, sn^2): the energy ratio is about 1 everywhere (chi-square, 200 frames)
    assert abs(np.median(st["ratio"]) - 1) < 0.05
    fig = plot.plot_residual(result, movie)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), st["mean"], atol=1e-4)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"jaxcnmf\[plot\]"):
        plot.pyplot()
