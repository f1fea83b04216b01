"""Tests of the initialisations: greedy seeds on simulated movies, rank-1 window fits and background against exact
references, the self-stopping rule on pure noise, one compiled shape, sparse NMF on elongated processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxcnmf import init
from jaxcnmf.errors import MovieError, ParameterError
from jaxcnmf.init import (
    _greedy_background,
    _greedy_round,
    _peak_above_slow,
    _prepare,
    _rescore_window,
    _window_of,
    background_hals,
    bin_frames,
    default_tsub,
    gaussian_blur,
    gaussian_kernel1d,
    greedy_init,
    rank1_nmf,
    score_filter,
    score_kernels,
    sparse_nmf_init,
    unbin_traces,
)


def _distances(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.hypot(est[:, None, 0] - true[None, :, 0], est[:, None, 1] - true[None, :, 1])


@pytest.fixture(scope="module")
def small_sim():
    sim = pytest.importorskip("jaxcnmf.sim")
    movie, truth = sim.simulate(seed=3, shape=(64, 64), n_frames=400, n_neurons=10, peak_snr=5.0, overlap=0.0)
    return movie, truth, sim.peak_snr(truth)


def test_greedy_finds_every_active_neuron_and_stops_by_itself(small_sim):
    movie, truth, snr = small_sim
    res = greedy_init(movie, 4.0)  # K not given: the noise rule stops it
    K = res.A.shape[1]
    assert res.A.shape == (64 * 64, K) and res.C.shape == (K, 400)
    assert res.b.shape == (64 * 64, 1) and res.f.shape == (1, 400)
    D = _distances(np.asarray(res.centers), truth.centers)
    findable = snr >= 2.0  # silent or very dim cells cannot be seen in 400 frames
    assert findable.sum() >= 8
    assert np.all(D[:, findable].min(axis=0) <= 2.0), D.min(axis=0)
    spurious = int(np.sum(D.min(axis=1) > 3.0))
    assert spurious <= 2, (spurious, D.min(axis=1))
    # found traces follow the true ones
    for k in np.flatnonzero(findable):
        j = int(np.argmin(D[:, k]))
        assert np.corrcoef(np.asarray(res.C[j]), truth.C[k])[0, 1] > 0.8
    # unit-norm non-negative footprints, non-negative traces, background near the median image
    np.testing.assert_allclose(np.linalg.norm(np.asarray(res.A), axis=0), 1.0, rtol=1e-4)
    assert float(res.A.min()) >= 0 and float(res.C.min()) >= 0 and float(res.b.min()) >= 0
    np.testing.assert_allclose(float(jnp.mean(res.f)), 1.0, rtol=1e-4)


def test_bin_frames_and_unbin_traces_against_plain_loops():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((11, 4, 5)).astype(np.float32)
    ref = np.stack([Y[j : j + 3].mean(axis=0) for j in range(0, 11, 3)])  # 4 bins, the last of 2 frames
    np.testing.assert_allclose(bin_frames(Y, 3, block=40), ref, rtol=1e-6)  # blocks of 2 bins
    np.testing.assert_array_equal(bin_frames(Y, 1), Y)
    X = rng.random((2, 4)).astype(np.float32)
    centres = np.array([1.0, 4.0, 7.0, 9.5])  # bin centres of frames 0-2, 3-5, 6-8, 9-10
    out = np.asarray(unbin_traces(X, 11, 3))
    for i in range(2):
        np.testing.assert_allclose(out[i], np.interp(np.arange(11), centres, X[i]), rtol=1e-6)
    assert out.shape == (2, 11) and out.min() >= 0
    assert default_tsub(3000, 3) == 3 and default_tsub(400, 3) == 1 and default_tsub(3000, 1) == 1
    # with a frame rate: 0.2 s of frames, at least n_smooth, fewer while under 200 bins would be left
    assert default_tsub(3000, 3, fps=30.0) == 6 and default_tsub(3000, 6, fps=60.0) == 12
    assert default_tsub(600, 3, fps=7.0) == 3  # 0.2 s is 1.4 frames: n_smooth decides
    assert default_tsub(1000, 3, fps=30.0) == 5 and default_tsub(600, 3, fps=30.0) == 3  # 200 bins at least
    assert default_tsub(500, 3, fps=30.0) == 1 and default_tsub(3000, 1, fps=None) == 1


def test_greedy_on_binned_frames_finds_the_same_neurons(small_sim):
    movie, truth, snr = small_sim
    res = greedy_init(movie, 4.0, tsub=2)
    assert res.C.shape == (res.A.shape[1], 400) and res.f.shape == (1, 400)  # traces back at every frame
    D = _distances(np.asarray(res.centers), truth.centers)
    findable = snr >= 2.0
    assert np.all(D[:, findable].min(axis=0) <= 2.0), D.min(axis=0)
    assert int(np.sum(D.min(axis=1) > 3.0)) <= 2
    for k in np.flatnonzero(findable):
        assert np.corrcoef(np.asarray(res.C[int(np.argmin(D[:, k]))]), truth.C[k])[0, 1] > 0.8
    for bad in (0, 1.5, 200, True, float("nan")):
        with pytest.raises(ParameterError, match="tsub"):
            greedy_init(movie, 4.0, tsub=bad)


def test_greedy_respects_K_and_compiles_once(small_sim):
    movie, _, _ = small_sim
    jitted = (_greedy_round, _window_of, _rescore_window)
    before = [f._cache_size() for f in jitted]
    res = greedy_init(movie, 4.0, K=7, batch=3)  # three rounds: 3 + 3 + 1 components
    assert res.A.shape[1] == 7
    res2 = greedy_init(movie[::-1].copy(), 4.0, K=5, batch=3)  # two more rounds, same shapes
    assert res2.A.shape[1] == 5
    assert all(f._cache_size() - b <= 1 for f, b in zip(jitted, before)), [f._cache_size() for f in jitted]


def test_greedy_round_works_only_where_the_footprint_reaches():
    """The round fits a on the support's square of Rp (half-width hs) and subtracts a c' there and filter(a) c' on
    the square of Bp it reaches (hs + hb - h), not on the whole windows: the same fits and working movies up to
    float32 rounding (the fit's sums skip the zero pixels outside the support)."""
    rng = np.random.default_rng(6)
    T, H, W, h, fit_radius = 50, 30, 32, 5, 3.0
    g_np, box_np = score_kernels(1.0, h)
    hb = pad = h + g_np.size // 2
    Rp = np.zeros((T, H + 2 * pad, W + 2 * pad), np.float32)
    Rp[:, pad:-pad, pad:-pad] = rng.standard_normal((T, H, W))
    Rp[:, pad + 10 : pad + 14, pad + 8 : pad + 12] += 4.0 * rng.random((T, 1, 1))  # something to fit
    g, box = jnp.asarray(g_np, jnp.float32), jnp.asarray(box_np, jnp.float32)
    Bp = np.asarray(jax.vmap(lambda f: score_filter(f, g, box))(jnp.asarray(Rp)))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    support = np.hypot(yy, xx) <= fit_radius
    inside = jnp.pad(jnp.ones((H, W), bool), pad)
    centres = jnp.asarray([[12, 10], [0, 31], [25, 3], [0, 0]], jnp.int32)  # two at the image's edges, one padding
    valid = jnp.asarray([True, True, True, False])
    a0 = jnp.asarray(np.exp(-0.5 * (yy**2 + xx**2) / 2.0).ravel(), jnp.float32)
    ring_med = init._ring_medians(jnp.asarray(Rp), centres, inside, h=h, pad=pad)
    snp = jnp.ones(inside.shape, jnp.float32)
    outs = []
    for hs in (h, int(fit_radius)):  # the whole window, the support's square
        outs.append(_greedy_round(
            jnp.asarray(Rp), jnp.asarray(Bp), centres, valid, a0, jnp.asarray(support.ravel()), inside, g, box,
            snp, jnp.asarray(0.0, jnp.float32), ring_med, h=h, hb=hb, hs=hs, pad=pad, n_iter=5, n_smooth=1, n_slow=10,
        ))
    assert bool(np.asarray(outs[0][-1])[:3].all())  # all three fits kept: each subtracted something
    assert not np.array_equal(np.asarray(outs[0][0]), Rp)
    np.testing.assert_array_equal(np.asarray(outs[0][-1]), np.asarray(outs[1][-1]))  # the same fits kept
    for x, y in zip(outs[0][:-1], outs[1][:-1]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * float(jnp.abs(y).max()))


def test_greedy_on_pure_noise_finds_almost_nothing():
    rng = np.random.default_rng(0)
    movie = (100.0 + rng.standard_normal((300, 48, 48))).astype(np.float32)
    res = greedy_init(movie, 4.0)
    assert res.A.shape[1] <= 1


def test_greedy_rejects_bad_input():
    movie = np.zeros((300, 48, 48), np.float32)  # the pure-noise test's shape: compiled already
    with pytest.raises(ParameterError, match="radius"):
        greedy_init(movie, 0.0)
    with pytest.raises(ParameterError, match="radius"):
        greedy_init(movie, 30.0)
    with pytest.raises(MovieError, match="shape"):
        greedy_init(movie[0], 3.0)
    bad = movie.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(MovieError, match="NaN"):
        greedy_init(bad, 3.0)
    assert greedy_init(movie, 4.0).A.shape == (48 * 48, 0)  # all-zero movie: nothing to find, no crash


def test_rank1_nmf_matches_leading_singular_pair():
    # for a non-negative matrix the best rank-1 approximation (Perron-Frobenius: non-negative singular vectors) is
    # also the best non-negative rank-1 factorisation, so the alternating fit must reach the SVD's leading pair
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        X = rng.random((40, 25)) + np.outer(rng.random(40), rng.random(25)) * 3
        a, c = rank1_nmf(jnp.asarray(X), jnp.ones(25), 200)
        U, s, Vt = np.linalg.svd(X)
        ref = s[0] * np.outer(U[:, 0], Vt[0])
        np.testing.assert_allclose(np.outer(np.asarray(c), np.asarray(a)), ref, rtol=1e-8, atol=1e-10)


def test_score_filter_matches_direct_correlation_and_kills_flat_background():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 30, 31))
    g, box = score_kernels(1.5, 5)
    with jax.enable_x64(True):
        out = np.asarray(score_filter(jnp.asarray(x), jnp.asarray(g), jnp.asarray(box)))
    k2 = np.outer(g, g) - np.outer(box, box)
    ref = np.stack([ndimage.correlate(frame, k2, mode="constant") for frame in x])
    np.testing.assert_allclose(out, ref, atol=1e-12)
    flat = np.asarray(score_filter(jnp.full((1, 30, 30), 7.0), jnp.asarray(g), jnp.asarray(box)))
    np.testing.assert_allclose(flat[0, 5:-5, 5:-5], 0.0, atol=1e-4)
    blur = np.asarray(gaussian_blur(jnp.ones((12, 12)), jnp.asarray(gaussian_kernel1d(1.0))))
    np.testing.assert_allclose(blur[4:-4, 4:-4], 1.0, atol=1e-6)


def test_prepare_by_blocks_matches_the_whole_movie_float64_reference():
    """`_prepare` works by blocks of frames (R, B) and of image rows (energy, peak, noise of B); whatever the block
    size (several blocks, the last one overlapping) it gives what the formulas give on the whole movie at once."""
    rng = np.random.default_rng(5)
    T, H, W, n_smooth, n_slow = 1103, 19, 23, 3, 60  # T > MEDIAN_SAMPLES: the medians use every step-th frame
    step = -(-T // init.MEDIAN_SAMPLES)
    assert step > 1
    Y = (100.0 + 10.0 * rng.standard_normal((T, H, W)) + 50.0 * (rng.random((T, H, W)) < 0.01)).astype(np.float32)
    g_np, box_np = score_kernels(1.5, 4)
    pad = 4 + g_np.size // 2
    with jax.enable_x64(True):
        median = np.median(Y[::step], axis=0)
        R = jnp.asarray(Y, jnp.float64) - median
        B = score_filter(R, jnp.asarray(g_np), jnp.asarray(box_np))
        E, P = jnp.sum(B * B, axis=0), _peak_above_slow(B, n_smooth, n_slow)
        sn = np.median(np.abs(np.diff(np.asarray(B), axis=0))[::step], axis=0) / (0.6744897501960817 * np.sqrt(2.0))
        R, B, E, P = (np.asarray(x) for x in (R, B, E, P))
    g, box = jnp.asarray(g_np, jnp.float32), jnp.asarray(box_np, jnp.float32)
    inner = (slice(None), slice(pad, pad + H), slice(pad, pad + W))
    outs = []
    blocks = [(5 * H * W, T * W), (174 * H * W, 3 * T * W), (10**9, 10**9)]  # 5 frames / 1 row, 174 / 3, one block
    blocks.append((init.FILTER_BLOCK, init.SCORE_BLOCK))  # the defaults
    for frames_block, rows_block in blocks:
        med, Rp, Bp, sn_b, Ep, Pp = _prepare(Y, g, box, pad=pad, n_smooth=n_smooth, n_slow=n_slow,
                                             frames_block=frames_block, rows_block=rows_block)
        Rp, Bp, Ep, Pp = (np.asarray(x) for x in (Rp, Bp, Ep, Pp))
        assert Rp.shape == Bp.shape == (T, H + 2 * pad, W + 2 * pad)
        assert Ep.shape == Pp.shape == (H + 2 * pad, W + 2 * pad)
        np.testing.assert_array_equal(np.asarray(med), median)
        for got, ref in ((Rp, R), (Bp, B), (Ep, E), (Pp, P)):
            outside = got.copy()
            outside[inner[-got.ndim :]] = 0.0
            assert not outside.any()  # zero padding
            np.testing.assert_allclose(got[inner[-got.ndim :]], ref, rtol=0, atol=2e-6 * np.abs(ref).max())
        np.testing.assert_allclose(sn_b, sn, rtol=2e-5)
        outs.append((Rp, Bp, sn_b, Ep, Pp))
    for other in outs[:2] + outs[3:]:  # blocked versus one block: the same float32 arithmetic
        for x, y in zip(other, outs[2]):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6 * np.abs(y).max())


def test_median0_equals_numpy_median_bit_for_bit():
    from jaxcnmf.init import _median0

    rng = np.random.default_rng(8)
    for n in (1, 2, 7, 334):
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((n, 5, 6)).astype(dtype)
            x[:, 0, 0] = 1.0  # ties
            x[: n // 2, 1, 1] = -x[n // 2 :, 1, 1][: n // 2]  # a symmetric column
            got = _median0(x)
            assert got.dtype == dtype and got.shape == (5, 6)
            np.testing.assert_array_equal(got, np.median(x, axis=0))


def test_greedy_background_equals_hals_on_the_formed_residual():
    """The greedy init's background fit takes its products on the padded residual without forming Y - A C; it must
    give what `background_hals` gives on the (d, T) matrix itself."""
    rng = np.random.default_rng(2)
    T, H, W, pad = 60, 7, 9, 3
    Rp = np.zeros((T, H + 2 * pad, W + 2 * pad), np.float32)
    Rp[:, pad:-pad, pad:-pad] = rng.standard_normal((T, H, W))
    Rp[:, :2, :] = 7.0  # whatever is on the border must not count
    static = (5.0 + rng.random((H, W))).astype(np.float32)
    b0, f0 = jnp.asarray(static.reshape(-1, 1)), jnp.ones((1, T), jnp.float32)
    M = jnp.asarray((Rp[:, pad:-pad, pad:-pad] + static).reshape(T, H * W).T)
    b_ref, f_ref = background_hals(M, b0, f0, n_iter=4)
    b, f = _greedy_background(jnp.asarray(Rp), jnp.asarray(static), b0, f0, pad=pad, n_iter=4)
    np.testing.assert_allclose(np.asarray(b), np.asarray(b_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(f), np.asarray(f_ref), rtol=1e-5)


def test_background_hals_recovers_exact_rank1():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        b = rng.random((50, 1)) + 0.5
        f = rng.random((1, 80)) + 0.5
        M = jnp.asarray(b @ f)
        b1, f1 = background_hals(M, jnp.ones((50, 1)), jnp.ones((1, 80)), n_iter=50)
        np.testing.assert_allclose(np.asarray(b1 @ f1), b @ f, rtol=1e-8)
        np.testing.assert_allclose(np.asarray(f1).mean(), 1.0, rtol=1e-12)


def _processes(H=40, W=40, T=600, seed=0):
    """Three thin, elongated, partly overlapping processes with sparse independent activity, noise, flat background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    A = np.zeros((3, H, W))
    A[0] = np.exp(-0.5 * ((yy - 12) / 0.8) ** 2) * (xx > 3) * (xx < 36)  # horizontal
    A[1] = np.exp(-0.5 * ((xx - 20) / 0.8) ** 2) * (yy > 3) * (yy < 36)  # vertical, crosses 0
    A[2] = np.exp(-0.5 * (((yy - xx) - 5) / 1.1) ** 2) * (xx > 8) * (xx < 34)  # diagonal, crosses both
    A[A < 0.05] = 0
    S = (rng.random((3, T)) < 0.03) * (1 + rng.random((3, T)))
    C = np.zeros((3, T))
    for t in range(1, T):
        C[:, t] = 0.9 * C[:, t - 1] + S[:, t]
    C *= 4.0
    Y = np.einsum("khw,kt->thw", A, C) + 20.0 + 0.5 * rng.standard_normal((T, H, W))
    return Y.astype(np.float32), A, C


def test_sparse_nmf_init_separates_crossing_processes():
    Y, A_true, C_true = _processes()
    res = sparse_nmf_init(Y, 3, sparsity=0.05, n_iter=150)
    assert res.A.shape == (40 * 40, 3)
    A_est = np.asarray(res.A).T
    corr = np.corrcoef(np.vstack([A_est, A_true.reshape(3, -1)]))[:3, 3:]
    # every true process is matched by its own component
    best = corr.argmax(axis=0)
    assert len(set(best.tolist())) == 3, corr
    assert np.all(corr.max(axis=0) > 0.8), corr
    ccorr = [np.corrcoef(np.asarray(res.C[best[k]]), C_true[k])[0, 1] for k in range(3)]
    assert min(ccorr) > 0.9, ccorr
    energy = np.linalg.norm(np.asarray(res.C), axis=1)  # columns of A have unit norm
    assert np.all(np.diff(energy) <= 1e-3 * energy[0])  # ordered by energy


def test_window_fit_on_a_disc_keeps_a_dim_rarely_active_neuron():
    # a dim blob (peak 0.8 noise sd per pixel) active in 3 bursts of 8 frames, in a 25x25 window of white noise:
    # on the whole window the alternating fit drifts to the noise's leading non-negative direction; on a disc of
    # 1.5 radii around the seed it stays on the neuron (what made the greedy init find only 11 components on
    # neurofinder_tr before)
    from jaxcnmf.init import window_rank1

    rng = np.random.default_rng(0)
    h, r, T = 12, 4.0, 600
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    blob = np.exp(-0.5 * (yy**2 + xx**2) / (r / 1.5) ** 2).ravel()
    c_true = np.zeros(T)
    for t0 in (100, 300, 450):
        c_true[t0 : t0 + 8] = 0.8
    X = np.outer(c_true, blob) + rng.standard_normal((T, blob.size))
    ring = np.flatnonzero(np.maximum(np.abs(yy), np.abs(xx)) == h)
    inside = np.ones(blob.size, bool)
    disc = (np.hypot(yy, xx) <= 1.5 * r).ravel()
    args = (jnp.asarray(X, jnp.float32), jnp.asarray(ring), jnp.asarray(inside), jnp.asarray(blob, jnp.float32), 10)
    a_all, c_all = window_rank1(*args)
    a_disc, c_disc = window_rank1(*args, jnp.asarray(disc))
    a_all, a_disc = np.asarray(a_all), np.asarray(a_disc)
    assert np.all(a_disc[~disc] == 0)
    on_blob = blob > 0.2
    assert np.sum(a_disc[on_blob] ** 2) > 0.5  # most of the footprint's energy on the neuron
    assert np.sum(a_all[on_blob] ** 2) < 0.3  # the whole-window fit went to noise (the failure this guards)
    r_disc, r_all = (np.corrcoef(np.asarray(c), c_true)[0, 1] for c in (c_disc, c_all))
    assert r_disc > 0.3 and r_disc > r_all + 0.1, (r_disc, r_all)


def test_greedy_finds_the_active_cells_of_a_real_movie():
    # neurofinder_tr (256x256x600, 54 anatomical labels, many silent): with the footprint fitted on the whole window
    # the init kept 11 of 463 seeds (4 labelled cells, recall 0.074); now it must reach the labelled cells that are
    # active. Measured: about 100 components, 14 labels matched (recall 0.26).
    from tests.conftest import shared_path
    from jaxcnmf.io import load_movie
    from jaxcnmf.metrics import load_regions, match_footprints

    folder = shared_path("neurofinder_tr")
    movie = load_movie(folder / "movie.tif")
    T, H, W = movie.shape
    regions = load_regions(folder / "regions.json", (H, W))
    res = greedy_init(movie, 4.5, fps=7.0)
    A = np.asarray(res.A).T.reshape(-1, H, W)
    m = match_footprints(A, regions)
    assert m.recall >= 0.2, (m.recall, m.n_est)
    assert 40 <= m.n_est <= 300  # stops by itself, well before the safeguard bound (1,030 for this field)


def test_ring_median_and_max_over_equal_the_jnp_reductions_bit_for_bit():
    # the greedy round's border median runs on the host (numpy sort, between jitted steps) and its peaks take the
    # max over frames by a loop (both for speed on XLA's CPU backend): the values must stay exactly those of
    # jnp.nanmedian / jnp.max, with masked entries (windows at the image border), an odd and an even number of used
    # entries, and under vmap
    from jaxcnmf.init import _max_over, _ring_median_host, ring_median

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 300, 40)), jnp.float32)
    use = np.ones((5, 40), bool)
    use[1, :13] = False  # 27 used
    use[2, 5:25] = False  # 20 used
    use[3] = False  # none: NaN, like jnp.nanmedian
    use = jnp.asarray(use)
    ref = jnp.nanmedian(jnp.where(use[:, None, :], x, jnp.nan), axis=-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(ring_median)(x, use)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(ring_median))(x, use)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(ring_median(x[0], use[0])), np.asarray(ref[0]))
    np.testing.assert_array_equal(_ring_median_host(np.asarray(x), np.asarray(use)), np.asarray(ref))
    for arr in (x, x[:, :, 0]):
        got = jax.jit(lambda a: _max_over(lambda t: 2.0 * a[t], 0, a.shape[0]))(arr)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.max(arr * 2.0, axis=0)))


def test_ring_medians_take_the_window_border():
    """`_ring_medians` (the border cut as four strips, medians on the host) equals jnp.nanmedian over the border
    pixels gathered from each whole window, inside and at the image's edges and corners."""
    rng = np.random.default_rng(7)
    T, H, W, h, pad = 30, 20, 24, 4, 6
    Rp = jnp.asarray(rng.standard_normal((T, H + 2 * pad, W + 2 * pad)), jnp.float32)
    inside = jnp.pad(jnp.ones((H, W), bool), pad)
    centres = jnp.asarray([[10, 12], [0, 0], [19, 23], [0, 13], [7, 23]], jnp.int32)
    w = 2 * h + 1
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    ring = np.flatnonzero(np.maximum(np.abs(yy), np.abs(xx)) == h)
    ref = []
    for r0, c0 in np.asarray(centres) + pad - h:
        X = np.asarray(Rp[:, r0 : r0 + w, c0 : c0 + w]).reshape(T, -1)[:, ring]
        use = np.asarray(inside[r0 : r0 + w, c0 : c0 + w]).ravel()[ring]
        ref.append(jnp.nanmedian(jnp.where(jnp.asarray(use), jnp.asarray(X), jnp.nan), axis=-1))
    got = init._ring_medians(Rp, centres, inside, h=h, pad=pad)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.stack(ref)))


def test_peak_above_slow_matches_a_plain_loop():
    """The transient peak (max over t of the n-frame mean of x minus its running mean over 2 half + 1 frames,
    truncated at the ends) by its cumulative sums and frame loop equals the formula's plain float64 loop: the
    n <= 8 path (frames summed per step) and the longer one (a second cumulative sum), traces shorter than the
    running mean, several pixels at once and under vmap."""
    rng = np.random.default_rng(4)

    def reference(x, n, half):
        T = x.shape[0]
        half, n = min(half, T - 1), min(n, T)
        xh = np.stack([x[t] - x[max(t - half, 0) : min(t + half, T - 1) + 1].mean(axis=0) for t in range(T)])
        return np.max([xh[t : t + n].mean(axis=0) for t in range(T - n + 1)], axis=0)

    for T, n, half in ((300, 1, 20), (300, 3, 20), (300, 12, 20), (40, 5, 60), (7, 12, 3)):
        x = (rng.standard_normal((T, 4, 3)) + 3.0 * (rng.random((T, 4, 3)) < 0.05)).astype(np.float32)
        ref = reference(x.astype(np.float64), n, half)
        got = np.asarray(jax.jit(lambda x: _peak_above_slow(x, n, half))(jnp.asarray(x)))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(x).max())
        pixels = jnp.asarray(x.reshape(T, -1).T)  # one trace per pixel, as the greedy round's progress check
        by_trace = jax.jit(jax.vmap(lambda v: _peak_above_slow(v, n, half)))(pixels)
        np.testing.assert_array_equal(np.asarray(by_trace), got.reshape(-1))


def test_embedding_windows_equals_the_dense_placement_and_its_centres_of_mass():
    """`_embed_windows` writes each round's (w, w) window into A (d, K) (cut at the image's edges) and takes the
    centres from the windows: both must equal placing the windows in a padded stack and reducing the dense A."""
    from jaxcnmf.init import _centres_of_mass, _embed_windows

    rng = np.random.default_rng(0)
    H, W, h, K = 40, 37, 5, 30
    w = 2 * h + 1
    win = (rng.random((K, w, w)) * (rng.random((K, w, w)) < 0.7)).astype(np.float32)
    corners = [(int(rng.integers(0, H)), int(rng.integers(0, W))) for _ in range(K)]
    corners[:3] = [(0, 0), (H - 1, W - 1), (2, W - 3)]  # windows cut by two edges, and by one corner
    padded = np.zeros((K, H + 2 * h, W + 2 * h), np.float32)
    for k, (r0, c0) in enumerate(corners):
        padded[k, r0 : r0 + w, c0 : c0 + w] = win[k]
    dense = padded[:, h : h + H, h : h + W].reshape(K, -1).T
    A, centres = _embed_windows(win, corners, H, W)
    np.testing.assert_array_equal(A, dense)
    np.testing.assert_allclose(centres, _centres_of_mass(dense, H, W), rtol=0, atol=1e-5)
