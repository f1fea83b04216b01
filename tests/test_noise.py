"""Tests of jaxcnmf.noise: PSD noise (per trace, streamed per pixel), AR estimation and its guard, tau <-> g."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import butter, lfilter, resample, sosfiltfilt

from jaxcnmf.errors import MovieError, ParameterError
from jaxcnmf.noise import (
    _estimate_noise,
    _movie_chunks,
    ar_roots,
    ar_to_tau,
    estimate_ar,
    estimate_noise,
    estimate_noise_movie,
    guard_ar,
    noise_cutoff,
    tau_to_ar,
)

METHODS = ("logmexp", "mean", "median")


def calcium(rng, g, n_traces, T, rate=0.05):
    """AR(p) calcium driven by Bernoulli spikes (float64), shape (n_traces, T)."""
    s = (rng.random((n_traces, T)) < rate).astype(float)
    return lfilter([1.0], np.r_[1.0, -np.asarray(g, float)], s, axis=-1)


def band_limited_noise(rng, n_traces, T, up, sd):
    """White noise of std `sd` sampled at 1/up of the rate and FFT-interpolated up: noise that is exactly white up to
    f_c = 0.5 / up (and empty above), with variance sd^2 and autocovariance sd^2 sinc(k / up)."""
    return resample(sd * rng.normal(size=(n_traces, T // up)), T, axis=-1)


def reference_noise(y, freq_range, method):
    """Slow float64 reference: explicit DFT sums at the band frequencies k/T (0 and Nyquist excluded)."""
    y = np.asarray(y, np.float64)
    T = y.size
    yc = y - y.mean()
    t = np.arange(T)
    P = []
    for k in range(1, (T + 1) // 2):
        f = k / T
        if freq_range[0] <= f <= freq_range[1]:
            re = np.sum(yc * np.cos(2 * np.pi * f * t))
            im = np.sum(yc * np.sin(2 * np.pi * f * t))
            P.append(2.0 / T * (re * re + im * im))
    P = np.array(P)
    avg = {"mean": P.mean(), "median": np.median(P) / math.log(2), "logmexp": np.exp(np.mean(np.log(P)) + 0.5772156649015329)}
    return math.sqrt(avg[method] / 2)


# ---------------------------------------------------------------------------------------------------------------------
# estimate_noise


@pytest.mark.parametrize("method", METHODS)
def test_noise_matches_float64_reference(method):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        for T, fr in [(301, (0.25, 0.5)), (256, (0.1, 0.4))]:
            y = rng.normal(size=T) + np.linspace(0, 3, T)
            got = float(estimate_noise(y, freq_range=fr, method=method))
            assert got == pytest.approx(reference_noise(y, fr, method), rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_noise_unbiased_on_white_noise(method):
    rng = np.random.default_rng(2)
    sd = 0.7
    y = (sd * rng.normal(size=(64, 4000))).astype(np.float32)
    sn = np.asarray(estimate_noise(y, method=method))
    assert sn.dtype == np.float32 and sn.shape == (64,)
    assert np.mean(sn) / sd == pytest.approx(1.0, abs=0.02)
    assert np.all(np.abs(sn / sd - 1) < 0.12)


@pytest.mark.parametrize("method", METHODS)
def test_noise_close_under_slow_calcium_and_drift(method):
    rng = np.random.default_rng(3)
    T = 6000
    g = np.asarray(tau_to_ar(1.0, 0.1, 30.0, p=2), np.float64)
    c = calcium(rng, g, 16, T, rate=0.03)
    drift = np.sin(np.linspace(0, 4 * np.pi, T)) * 3.0
    sd = 0.5
    y = c / c.std() * 2.0 + drift + sd * rng.normal(size=c.shape)
    sn = np.asarray(estimate_noise(y, method=method))
    assert np.median(sn) / sd == pytest.approx(1.0, abs=0.05)


def test_noise_batch_shapes_and_dtype():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(2, 3, 500)).astype(np.float32)
    batched = np.asarray(estimate_noise(y))
    assert batched.shape == (2, 3)
    loop = np.array([[float(estimate_noise(y[i, j])) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(batched, loop, rtol=1e-6)
    assert np.asarray(estimate_noise(y[0, 0])).shape == ()
    assert estimate_noise(np.arange(100, dtype=np.int16)).dtype == jnp.float32
    assert float(estimate_noise(np.full(100, 3.0))) == 0.0  # constant trace
    assert np.isnan(float(estimate_noise(np.r_[np.ones(50), np.nan, np.ones(49)])))
    vm = jax.jit(jax.vmap(estimate_noise))(y.reshape(6, 500))
    np.testing.assert_allclose(np.asarray(vm), batched.ravel(), rtol=1e-6)


def test_noise_compiles_once_per_shape():
    rng = np.random.default_rng(5)
    before = _estimate_noise._cache_size()
    for _ in range(3):
        estimate_noise(rng.normal(size=(5, 333)).astype(np.float32))
    assert _estimate_noise._cache_size() == before + 1


def test_noise_with_length_ignores_padding():
    rng = np.random.default_rng(6)
    T = 3000
    lengths = np.array([3000, 2200, 1500, 800])
    y = rng.normal(size=(4, T))
    padded = y.copy()
    for i, n in enumerate(lengths):
        padded[i, n:] = np.nan
    got = np.asarray(estimate_noise(padded, length=lengths))
    assert np.all(np.isfinite(got))
    assert got[0] == pytest.approx(float(estimate_noise(y[0])), rel=1e-6)
    trimmed = np.array([float(estimate_noise(y[i, :n])) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(got, trimmed, rtol=0.06)
    # unbiased on padded white noise
    many = rng.normal(size=(64, T))
    n = rng.integers(800, T, size=64)
    assert np.mean(np.asarray(estimate_noise(many, length=n))) == pytest.approx(1.0, abs=0.02)


def test_noise_bad_arguments():
    y = np.zeros(100)
    with pytest.raises(ParameterError, match="method"):
        estimate_noise(y, method="max")
    with pytest.raises(ParameterError, match="freq_range"):
        estimate_noise(y, freq_range=(0.4, 0.2))
    with pytest.raises(ParameterError, match="no frequency bin"):
        estimate_noise(np.zeros(2))
    with pytest.raises(ParameterError, match="freq_range"):
        estimate_noise(y, freq_range="top")
    with pytest.raises(ParameterError, match="too short"):
        estimate_noise(np.zeros(3), freq_range="auto")


# ---------------------------------------------------------------------------------------------------------------------
# estimate_noise_movie


class CountingSource:
    """Stand-in for jaxcnmf.io.MovieSource that records every read."""

    def __init__(self, movie):
        self.movie = movie
        self.shape = movie.shape
        self.path = None
        self.reads = []

    def __len__(self):
        return self.shape[0]

    def read(self, start=0, stop=None):
        stop = self.shape[0] if stop is None else stop
        self.reads.append((start, stop))
        return np.asarray(self.movie[start:stop], np.float32)


def test_movie_chunks_cover_with_equal_windows():
    assert _movie_chunks(2500, 1000) == [(0, 1000, 1.0), (1000, 2000, 1.0), (1500, 2500, 0.5)]
    assert _movie_chunks(300, 1000) == [(0, 300, 1.0)]
    assert _movie_chunks(2000, 1000) == [(0, 1000, 1.0), (1000, 2000, 1.0)]


@pytest.mark.parametrize("method", METHODS)
def test_movie_streamed_agrees_with_whole_trace(method):
    rng = np.random.default_rng(7)
    T, H, W = 2500, 6, 7
    sd = rng.uniform(0.5, 3.0, size=(H, W))
    movie = (rng.normal(size=(T, H, W)) * sd).astype(np.float32)
    src = CountingSource(movie)
    streamed = estimate_noise_movie(src, chunk_frames=1000, method=method)
    assert streamed.shape == (H, W) and streamed.dtype == np.float32
    assert src.reads == [(0, 1000), (1000, 2000), (1500, 2500)]  # never more than one chunk in memory
    whole = np.asarray(estimate_noise(np.moveaxis(movie, 0, -1), method=method))
    ratio = streamed / whole
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.02)
    assert np.all(np.abs(ratio - 1) < 0.1)
    assert np.mean(streamed / sd) == pytest.approx(1.0, abs=0.03)
    # one window holding the whole movie is exactly the whole-trace estimate
    np.testing.assert_allclose(estimate_noise_movie(movie, chunk_frames=T, method=method), whole, rtol=1e-5)


@pytest.mark.parametrize("T", [600, 601])
@pytest.mark.parametrize("method", METHODS)
def test_movie_by_pixel_blocks_equals_one_block(method, T, monkeypatch):
    """Each chunk is processed by blocks of pixels (memory, threads); the blocks, the last one overlapping, must give
    the whole-trace estimate of every pixel. 600 frames go through the band DFT (blocks of 8 pixels: starts 0, 8, 16,
    24, 27), 601 (a prime) through the FFT (blocks of 3 rows: starts 0, 3, 4)."""
    import jaxcnmf.noise as noise

    rng = np.random.default_rng(3)
    H, W = 7, 5
    movie = (rng.normal(size=(T, H, W)) * rng.uniform(0.5, 3.0, size=(H, W))).astype(np.float32)
    whole = np.asarray(estimate_noise(np.moveaxis(movie, 0, -1), method=method))
    assert (noise._dft_plan(T, (0.25, 0.5)) is None) == (T == 601)
    monkeypatch.setattr(noise, "NOISE_BLOCK", 16 * T)
    np.testing.assert_allclose(estimate_noise_movie(movie, chunk_frames=T, method=method), whole, rtol=1e-5)


def reference_movie_noise(movie, chunk_frames, freq_range, method):
    """Plain float64 numpy reference of `estimate_noise_movie`: windows of L frames (the last one ending at T,
    weighted by its share of new frames), per pixel and window the rfft periodogram's band statistic, averaged."""
    T = movie.shape[0]
    L = min(chunk_frames, T)
    starts = list(range(0, T - L + 1, L))
    weights = [1.0] * len(starts)
    if T % L:
        starts.append(T - L)
        weights.append((T % L) / L)
    k = np.arange(L // 2 + 1)
    band = (k / L >= freq_range[0]) & (k / L <= freq_range[1]) & (k > 0) & (2 * k < L)
    total = 0.0
    for s, w in zip(starts, weights):
        y = movie[s : s + L].astype(np.float64).reshape(L, -1)
        P = 2.0 / L * np.abs(np.fft.rfft(y - y.mean(axis=0), axis=0)[band]) ** 2
        stat = {"mean": P.mean(0), "median": np.median(P, 0) / math.log(2), "logmexp": np.log(P).mean(0)}[method]
        total = total + w * stat
    avg = total / (T / L)
    if method == "logmexp":
        avg = np.exp(avg + 0.5772156649015329)
    return np.sqrt(avg / 2).reshape(movie.shape[1:])


@pytest.mark.parametrize("method", METHODS)
def test_movie_matches_numpy_rfft_reference(method):
    """Every window length's path (band DFT with an even and an odd stage-1 length, FFT for a prime) and band, on a
    movie with an offset whose T is not a multiple of the window, from an array and from a MovieSource."""
    import jaxcnmf.noise as noise

    rng = np.random.default_rng(30)
    T, H, W = 530, 9, 11
    movie = 100.0 + rng.normal(size=(T, H, W)) * rng.uniform(0.5, 3.0, size=(H, W))
    movie += np.cumsum(rng.normal(size=(T, 1, 1)), axis=0)  # slow drift: low frequencies far above the band
    movie = movie.astype(np.float32)
    for L, fr, N1 in ((200, (0.25, 0.5), 10), (225, (0.25, 0.5), 15), (211, (0.25, 0.5), None), (200, (0.1, 0.4), 20)):
        plan = noise._dft_plan(L, fr)
        assert (plan and plan[0]) == N1
        want = reference_movie_noise(movie, L, fr, method)
        for src in (movie, CountingSource(movie)):
            got = estimate_noise_movie(src, chunk_frames=L, freq_range=fr, method=method)
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_movie_errors():
    movie = np.zeros((100, 3, 3), np.float32)
    movie[50, 1, 1] = np.nan
    with pytest.raises(MovieError, match="frames 0..99"):
        estimate_noise_movie(movie)
    for L in (100, 101):  # band DFT, FFT
        movie = np.ones((250, 3, 3), np.float32)
        movie[180, 2, 0] = np.inf
        with pytest.raises(MovieError, match=f"frames {L}..{2 * L - 1}"):
            estimate_noise_movie(movie, chunk_frames=L)
        movie[180, 2, 0] = 3e38  # finite: the sum overflows, yet no error (the estimate is not finite)
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point here
            assert not np.isfinite(estimate_noise_movie(movie, chunk_frames=L)[2, 0])
    with pytest.raises(MovieError, match="at least 8"):
        estimate_noise_movie(np.zeros((5, 3, 3)))
    with pytest.raises(MovieError, match="shape"):
        estimate_noise_movie(np.zeros((5, 3)))
    with pytest.raises(ParameterError, match="chunk_frames"):
        estimate_noise_movie(np.zeros((100, 3, 3)), chunk_frames=4)


def test_cutoff_is_nyquist_for_white_noise_and_calcium():
    rng = np.random.default_rng(20)
    y = rng.normal(size=(32, 3000)).astype(np.float32)
    assert np.all(np.asarray(noise_cutoff(y)) == 0.5)
    g = np.asarray(tau_to_ar(1.0, 0.05, 30.0, p=2), np.float64)  # AR(2): the steepest calcium spectrum, 1/f^4
    c = calcium(rng, g, 16, 6000, rate=0.05)
    y = 20 * c / c.std() + 0.1 * rng.normal(size=c.shape)  # SNR 200: the calcium spans decades above the noise
    assert np.all(np.asarray(noise_cutoff(y)) == 0.5)
    assert np.all(np.asarray(noise_cutoff(np.ones((2, 500)))) == 0.5)  # constant
    assert np.all(np.asarray(noise_cutoff(rng.normal(size=(3, 20)))) == 0.5)  # too short to tell


@pytest.mark.parametrize("up", [2, 4, 10])
def test_cutoff_and_auto_noise_of_resampled_noise(up):
    rng = np.random.default_rng(21)
    T, sd = 12000, 0.3
    y = band_limited_noise(rng, 8, T, up, sd)
    fc = np.asarray(noise_cutoff(y))
    assert np.all(np.abs(fc - 0.5 / up) <= 2 / 512 + 1e-6)  # placed to ~1/512 of the rate (band width)
    sn = np.asarray(estimate_noise(y, freq_range="auto", method="mean"))
    np.testing.assert_allclose(sn, y.std(axis=-1), rtol=0.06)  # the noise as it is in the trace
    assert np.median(sn) / sd == pytest.approx(1.0, abs=0.04)
    assert np.all(np.asarray(estimate_noise(y, method="mean")) < 0.05 * sd)  # what the fixed band sees: ~nothing
    # with slow calcium on top (resampled the same way), the noise is still found
    g = np.asarray(tau_to_ar(20.0, 2.0, 1.0, p=2), np.float64)  # decay 20, rise 2 frames of the slow rate
    c = resample(calcium(rng, g, 8, T // up, rate=0.03), T, axis=-1)
    sn_c = np.asarray(estimate_noise(y + 2 * sd * c / c.std(), freq_range="auto", method="mean"))
    assert np.median(sn_c) / sd == pytest.approx(1.0, abs=0.08)


def test_auto_noise_of_butterworth_filtered_noise():
    rng = np.random.default_rng(22)
    y = sosfiltfilt(butter(8, 0.3, output="sos"), rng.normal(size=(8, 8000)), axis=-1)  # cut at 0.15 of the rate
    fc = np.asarray(noise_cutoff(y))
    assert np.all((fc > 0.12) & (fc < 0.2))
    sn = np.asarray(estimate_noise(y, freq_range="auto", method="mean"))
    np.testing.assert_allclose(sn, y.std(axis=-1), rtol=0.08)


@pytest.mark.parametrize("method", METHODS)
def test_auto_noise_matches_float64_reference(method):
    rng = np.random.default_rng(23)
    with jax.enable_x64(True):
        for y in (band_limited_noise(rng, 1, 2400, 5, 1.0)[0] + np.linspace(0, 1, 2400), rng.normal(size=2401)):
            fc = float(noise_cutoff(y))
            want = reference_noise(y, (fc / 2, fc), method) * math.sqrt(min(1.0, 2 * fc))
            assert float(estimate_noise(y, freq_range="auto", method=method)) == pytest.approx(want, rel=1e-10)
    # no cut-off: exactly the fixed (0.25, 0.5) band, with padding too
    y = rng.normal(size=(6, 1500)).astype(np.float32)
    n = np.array([1500, 1400, 1000, 900, 700, 600])
    for m in METHODS:
        np.testing.assert_allclose(np.asarray(estimate_noise(y, freq_range="auto", method=m, length=n)),
                                   np.asarray(estimate_noise(y, method=m, length=n)), rtol=1e-6)


def test_auto_noise_with_length_and_compiles_once():
    rng = np.random.default_rng(24)
    T = 6000
    y = band_limited_noise(rng, 3, T, 4, 1.0)
    lengths = np.array([6000, 4000, 3000])
    padded = y.copy()
    for i, n in enumerate(lengths):
        padded[i, n:] = np.nan
    got = np.asarray(estimate_noise(np.nan_to_num(padded), freq_range="auto", length=lengths))
    alone = np.array([float(estimate_noise(y[i, :n], freq_range="auto")) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(got, alone, rtol=0.03)
    np.testing.assert_allclose(np.asarray(noise_cutoff(np.nan_to_num(padded), length=lengths)), 0.125, atol=2 / 512)
    from jaxcnmf.noise import _estimate_noise_auto

    before = _estimate_noise_auto._cache_size()
    for _ in range(3):
        estimate_noise(rng.normal(size=(4, 777)).astype(np.float32), freq_range="auto")
    assert _estimate_noise_auto._cache_size() == before + 1


# ---------------------------------------------------------------------------------------------------------------------
# estimate_ar and its guard


def reference_ar(y, p, sn, lags, fc=0.5):
    """float64 numpy reference of the (unguarded) ridge least-squares Yule-Walker estimate; noise white up to fc has
    the autocovariance sn^2 sin(2 pi fc k) / (2 pi fc k)."""
    y = np.asarray(y, np.float64)
    n = y.size
    yc = y - y.mean()
    m = p + lags
    r = np.array([np.dot(yc[: n - k], yc[k:]) / n for k in range(m + 1)])
    k = np.arange(m + 1)
    rn = sn**2 * np.array([1.0] + [math.sin(2 * math.pi * fc * j) / (2 * math.pi * fc * j) for j in k[1:]])
    if fc == 0.5:
        rn[1:] = 0.0
    rc = r - rn
    rc[0] = max(rc[0], 0.0)
    M = np.array([[rc[abs(k - j)] for j in range(1, p + 1)] for k in range(1, m + 1)])
    lam = m * sn**4 / n
    A = np.vstack([M, math.sqrt(lam) * np.eye(p)])
    b = np.r_[rc[1:], np.zeros(p)]
    return np.linalg.lstsq(A, b, rcond=None)[0]


@pytest.mark.parametrize("p", [1, 2])
def test_ar_matches_float64_reference(p):
    rng = np.random.default_rng(8)
    g = [0.9] if p == 1 else [1.6, -0.63]
    y = calcium(rng, g, 1, 3000)[0] + 0.5 * rng.normal(size=3000)
    with jax.enable_x64(True):
        got = np.asarray(estimate_ar(y, p, sn=0.5, lags=4))
        np.testing.assert_allclose(got, reference_ar(y, p, 0.5, 4), rtol=1e-9)
        yb = calcium(rng, g, 1, 3000)[0] + band_limited_noise(rng, 1, 3000, 3, 0.5)[0]
        got = np.asarray(estimate_ar(yb, p, sn=0.5, lags=6, noise_cutoff=1 / 6))
        want = np.asarray(guard_ar(reference_ar(yb, p, 0.5, 6, fc=1 / 6)))
        np.testing.assert_allclose(got, want, rtol=1e-9)


def reference_auto_lags(y, sn, fc=0.5):
    """Extra lags of lags="auto": the decay time in frames of the guarded AR(1) fit over 5 extra lags, in 5..60."""
    d = float(np.asarray(guard_ar(reference_ar(y, 1, sn, 5, fc)))[0])
    return int(np.clip(np.ceil(-1 / np.log(d)), 5, 60))


@pytest.mark.parametrize("p", [1, 2])
def test_ar_auto_lags_matches_float64_reference(p):
    rng = np.random.default_rng(27)
    with jax.enable_x64(True):
        for g, fc in (([0.97], 0.5), ([1.6, -0.63], 0.5), ([0.995], 0.5), ([0.97], 0.1)):
            noise = band_limited_noise(rng, 1, 4000, 5, 0.3)[0] if fc < 0.5 else 0.3 * rng.normal(size=4000)
            y = calcium(rng, g, 1, 4000)[0] + noise
            lags = reference_auto_lags(y, 0.3, fc)
            got = np.asarray(estimate_ar(y, p, sn=0.3, lags="auto", noise_cutoff=fc))
            want = np.asarray(guard_ar(reference_ar(y, p, 0.3, lags, fc)))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert reference_auto_lags(calcium(rng, [0.99], 1, 20000)[0] + 0.1 * rng.normal(size=20000), 0.1) > 50


def test_ar_auto_lags_recovers_slow_kernels_and_compiles_once():
    """At a fast frame rate (decay 100 frames) the fit spans the decay: AR(1) within 2 %."""
    rng = np.random.default_rng(28)
    y = (calcium(rng, [0.99], 12, 30000, rate=0.01) + 0.3 * rng.normal(size=(12, 30000))).astype(np.float32)
    roots = np.asarray(ar_roots(estimate_ar(y, 1, sn=0.3, lags="auto")))
    assert abs(np.median(roots) / 0.99 - 1) < 0.02
    from jaxcnmf.noise import _estimate_ar

    before = _estimate_ar._cache_size()
    for _ in range(3):
        estimate_ar(rng.normal(size=(3, 500)).astype(np.float32), 2, lags="auto")
    assert _estimate_ar._cache_size() == before + 1
    with pytest.raises(ParameterError, match="lags"):
        estimate_ar(np.zeros(100), 2, lags="many")
    with pytest.raises(ParameterError, match="too short"):
        estimate_ar(np.zeros(50), 2, lags="auto")


def test_ar_float32_matches_float64_on_drifting_slow_traces():
    """Slow kernels plus a random-walk drift make the autocovariance nearly flat over the lags (M'M nearly singular):
    the float32 estimate must still be the float64 one (the normal equations in float32 gave NaN or clipped kernels)."""
    rng = np.random.default_rng(26)
    T = 20000
    c = calcium(rng, [1.975, -0.9751], 8, T, rate=0.01)
    y = c + 0.05 * np.cumsum(rng.normal(size=(8, T)), axis=-1) + 0.05 * rng.normal(size=(8, T))
    g32 = np.asarray(estimate_ar(y.astype(np.float32), 2, sn=0.05))
    with jax.enable_x64(True):
        g64 = np.asarray(estimate_ar(y, 2, sn=0.05))
    assert np.all(np.isfinite(g32))
    np.testing.assert_allclose(g32, g64, atol=2e-3)


@pytest.mark.parametrize("g", [[0.97], [1.75, -0.7625]])
def test_ar_under_band_limited_noise(g):
    """Calcium that is exactly AR(g) plus noise of known std white up to 0.1 of the rate (correlated over ~5 frames):
    removing the noise's whole autocovariance recovers the kernel; removing it at lag 0 only (white-noise model) does
    not. (The calcium's own spectrum reaches Nyquist here, so the cut-off is given, not detected.)"""
    rng = np.random.default_rng(25)
    T, sd = 20000, 1.0
    c = calcium(rng, g, 8, T, rate=0.02)
    y = (c + band_limited_noise(rng, 8, T, 5, sd)).astype(np.float32)
    true_roots = np.asarray(ar_roots(jnp.asarray(g)))
    banded = np.median(np.asarray(ar_roots(estimate_ar(y, len(g), sn=sd, noise_cutoff=0.1, lags=10))), axis=0)
    white = np.median(np.asarray(ar_roots(estimate_ar(y, len(g), sn=sd, lags=10))), axis=0)
    rtol = np.array([0.02, 0.1])[: len(g)]
    assert np.all(np.abs(banded / true_roots - 1) < rtol)
    assert np.abs(white[-1] / true_roots[-1] - 1) > 2 * np.abs(banded[-1] / true_roots[-1] - 1)


@pytest.mark.parametrize(
    "g, sd",
    [([0.95], 0.3), ([0.95], 1.0), ([1.7, -0.712], 0.3), ([1.7, -0.712], 1.0)],
)
def test_ar_recovers_kernel_of_long_noisy_traces(g, sd):
    rng = np.random.default_rng(9)
    c = calcium(rng, g, 12, 20000)
    y = (c + sd * rng.normal(size=c.shape)).astype(np.float32)
    est = np.asarray(estimate_ar(y, len(g)))
    true_roots = np.asarray(ar_roots(jnp.asarray(g)))
    rtol = np.array([0.03, 0.07])[: len(g)]  # the decay root within 3 %, the (harder) rise root within 7 %
    assert np.all(np.abs(np.median(np.asarray(ar_roots(est)), axis=0) / true_roots - 1) < rtol)
    # given the true noise level
    est_sn = np.asarray(estimate_ar(y, len(g), sn=sd))
    assert np.all(np.abs(np.median(np.asarray(ar_roots(est_sn)), axis=0) / true_roots - 1) < rtol)


def test_ar_batch_vmap_length_and_compile_once():
    rng = np.random.default_rng(10)
    y = (calcium(rng, [0.9], 6, 800) + 0.3 * rng.normal(size=(6, 800))).astype(np.float32)
    batched = np.asarray(estimate_ar(y.reshape(2, 3, 800), 2))
    assert batched.shape == (2, 3, 2)
    vm = np.asarray(jax.jit(jax.vmap(lambda t: estimate_ar(t, 2)))(y))
    np.testing.assert_allclose(vm, batched.reshape(6, 2), rtol=1e-5, atol=1e-6)
    padded = y.copy()
    padded[:, 600:] = np.nan
    with_len = np.asarray(estimate_ar(padded, 1, length=600))
    trimmed = np.asarray(estimate_ar(y[:, :600], 1))
    np.testing.assert_allclose(with_len, trimmed, rtol=0.1, atol=0.02)
    assert np.all(np.isfinite(with_len))


def test_guard_white_noise_constant_and_invalid_kernels():
    rng = np.random.default_rng(11)
    for p in (1, 2):
        g = np.asarray(estimate_ar(rng.normal(size=(16, 10000)), p))
        roots = np.asarray(ar_roots(g))
        assert np.all(np.isfinite(g)) and np.all(roots >= 0.99e-3) and np.all(roots <= 0.7)  # decay under 3 frames
        assert np.median(roots[:, 0]) < 0.4
        flat = np.asarray(ar_roots(estimate_ar(np.full(200, 2.0), p)))  # constant: the shortest allowed kernel
        np.testing.assert_allclose(flat, np.full(p, 1e-3), rtol=1e-6)
    # a valid kernel is left as it is
    valid = np.array([1.7, -0.712], np.float32)
    np.testing.assert_allclose(np.asarray(guard_ar(valid)), valid, rtol=1e-6)
    # oscillating (complex roots 0.5 +- 0.8i): a double root at the real part 0.5
    np.testing.assert_allclose(np.asarray(guard_ar(np.array([1.0, -0.89]))), [1.0, -0.25], rtol=1e-6)
    # unstable and sign-alternating
    np.testing.assert_allclose(np.asarray(guard_ar(np.array([1.05]))), [0.999], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(guard_ar(np.array([-0.4]))), [1e-3])
    np.testing.assert_allclose(np.asarray(guard_ar(np.array([-0.4]), min_root=0.0)), [0.0])
    # roots (1.309, -0.809) -> (0.999, 0.001)
    np.testing.assert_allclose(np.asarray(guard_ar(np.array([0.5, 1.059]))), [1.0, -0.000999], rtol=1e-5)
    out = np.asarray(guard_ar(np.array([[2.5, -1.2], [0.2, 0.3], [-1.0, -0.2], [0.0, 0.0]])))
    roots = np.asarray(ar_roots(out))
    assert np.all((roots >= 0.99e-3) & (roots <= 0.999))
    # any input gives real roots in range, checked in the array's own precision (float32 here)
    rand = np.random.default_rng(12).uniform(-3, 3, size=(20000, 2)).astype(np.float32)
    rand[::2, 1] = -((rand[::2, 0] / 3) ** 2)  # (nearly) double roots
    rand[::2, 0] *= 2 / 3
    out = np.asarray(guard_ar(rand))
    g1, g2 = out[:, 0], out[:, 1]
    assert out.dtype == np.float32 and np.all(g1 * g1 + 4 * g2 >= 0) and np.all(g2 <= 0)
    top = (g1 + np.sqrt(g1 * g1 + 4 * g2)) / 2
    assert np.all((top > 0) & (top < 1))
    # an oscillating kernel estimated from an oscillating trace becomes valid
    t = np.arange(5000)
    osc = np.sin(2 * np.pi * t / 7.0) + 0.1 * rng.normal(size=5000)
    roots = np.asarray(ar_roots(estimate_ar(osc, 2)))
    assert np.all((roots >= 0.99e-3) & (roots <= 0.999)) and roots[0] >= roots[1]


def test_ar_bad_arguments():
    with pytest.raises(ParameterError, match="p=3"):
        estimate_ar(np.zeros(100), 3)
    with pytest.raises(ParameterError, match="too short"):
        estimate_ar(np.zeros(5), 2)
    with pytest.raises(ParameterError, match="lags"):
        estimate_ar(np.zeros(100), 2, lags=-1)


# ---------------------------------------------------------------------------------------------------------------------
# tau <-> g


def test_tau_ar_round_trip_exact():
    with jax.enable_x64(True):
        fps = 30.0
        td, tr = np.array([0.4, 1.0, 2.5]), np.array([0.02, 0.1, 0.3])
        g = tau_to_ar(td, tr, fps)
        assert g.shape == (3, 2)
        np.testing.assert_allclose(np.asarray(g[:, 0]), np.exp(-1 / (td * fps)) + np.exp(-1 / (tr * fps)), rtol=1e-14)
        back_d, back_r = ar_to_tau(g, fps)
        np.testing.assert_allclose(np.asarray(back_d), td, rtol=1e-11)
        np.testing.assert_allclose(np.asarray(back_r), tr, rtol=1e-11)
        g1 = tau_to_ar(1.0, None, fps)
        assert g1.shape == (1,) and float(g1[0]) == pytest.approx(math.exp(-1 / 30.0), rel=1e-15)
        assert tau_to_ar(1.0, 0.0, fps).shape == (1,)
        d, r = ar_to_tau(g1, fps)
        assert float(d) == pytest.approx(1.0, rel=1e-13) and float(r) == 0.0
        np.testing.assert_allclose(np.asarray(tau_to_ar(*ar_to_tau(g, fps), fps)), np.asarray(g), rtol=1e-13)
        # a zero root is a time of 0, and back
        g0 = tau_to_ar(1.0, 0.0, fps, p=2)
        assert float(g0[1]) == 0.0 and float(ar_to_tau(g0, fps)[1]) == 0.0
    with pytest.raises(ParameterError, match="rise"):
        tau_to_ar(1.0, 0.1, 30.0, p=1)
