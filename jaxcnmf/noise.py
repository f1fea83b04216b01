"""Noise level and calcium kinetics of traces: PSD noise per trace or per pixel, AR coefficients, decay/rise times.

First step of the temporal side: `sn` (per pixel, per trace) and `g` feed deconvolution and the spatial update.

The noise standard deviation comes from the one-sided periodogram P(f) = (2/T)|FFT(y - mean y)(f)|^2 averaged over the
upper frequencies, where calcium transients have almost no power (for white noise of variance s^2, E[P] = 2 s^2, so
sn = sqrt(avg P / 2)). Traces that were resampled or low-pass filtered hold no noise above some cut-off f_c < 0.5
(their spectrum falls by orders of magnitude there, which calcium plus white noise cannot do): `noise_cutoff` finds
f_c from a tapered spectrum, and `freq_range="auto"` then averages over [f_c/2, f_c] and reports the standard
deviation of the band-limited noise that is in the trace. The AR coefficients come from the autocovariance with the white-noise term removed at lag 0, a
least-squares Yule-Walker fit over a few extra lags, and a guard that makes the kernel stable, decaying and
non-oscillating. CaImAn users: `estimate_noise` replaces `noise_range`/`noise_method` (`freq_range`, `method`),
`estimate_ar` replaces `estimate_time_constant` (`p`, `lags`), and `tau_to_ar`/`ar_to_tau` replace the conversions
done around `decay_time`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .errors import MovieError, ParameterError

EULER_GAMMA = 0.5772156649015329
"""E[log X] = log E[X] - EULER_GAMMA for an exponentially distributed X (the periodogram of noise)."""

NOISE_METHODS = ("logmexp", "mean", "median")


# ----------------------------------------------------------------------------------------------------------------------
# noise level


def _check_noise_args(freq_range, method) -> tuple[float, float]:
    if method not in NOISE_METHODS:
        raise ParameterError(f"method={method!r}: expected one of {NOISE_METHODS}.")
    try:
        lo, hi = (float(v) for v in freq_range)
    except (TypeError, ValueError):
        raise ParameterError(
            f"freq_range={freq_range!r}: expected two numbers (lo, hi), fractions of the sampling rate, "
            "e.g. (0.25, 0.5)."
        ) from None
    if not 0.0 <= lo < hi <= 0.5:
        raise ParameterError(
            f"freq_range={freq_range!r}: need 0 <= lo < hi <= 0.5 (fractions of the sampling rate; 0.5 is Nyquist)."
        )
    return lo, hi


def _band_bins(T: int, freq_range: tuple[float, float]) -> np.ndarray:
    """Indices of the rfft bins k with lo <= k/T <= hi, excluding 0 and the Nyquist bin.

    **Arguments:**
    - `T`: number of frames (the FFT length).
    - `freq_range`: (lo, hi) as fractions of the sampling rate.

    **Returns:** an int array of bin indices (static: depends on shapes only).
    """
    lo, hi = freq_range
    k = np.arange(T // 2 + 1)
    f = k / T
    keep = (f >= lo) & (f <= hi) & (f > 0) & (2 * k < T)
    return k[keep]


def _checked_band_bins(T: int, freq_range) -> np.ndarray:
    """`_band_bins`, raising ParameterError when the band holds no bin."""
    bins = _band_bins(T, freq_range)
    if bins.size == 0:
        raise ParameterError(
            f"estimate_noise: a trace of {T} frames has no frequency bin in freq_range={tuple(freq_range)}; "
            "use longer traces (at least 4 frames) or a wider freq_range."
        )
    return bins


def _to_float(y) -> jax.Array:
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.float32)
    return y


def _masked_centred(y: jax.Array, length) -> tuple[jax.Array, jax.Array]:
    """Mean-removed trace with the frames at or after `length` set to 0, and the number of valid frames."""
    T = y.shape[-1]
    if length is None:
        return y - jnp.mean(y, axis=-1, keepdims=True), jnp.asarray(T, y.dtype)
    n = jnp.asarray(length)
    valid = jnp.arange(T) < n[..., None]
    y0 = jnp.where(valid, y, 0)
    nf = n.astype(y.dtype)
    mean = jnp.sum(y0, axis=-1, keepdims=True) / nf[..., None]
    return jnp.where(valid, y0 - mean, 0), nf


def _band_periodogram(y: jax.Array, freq_range, length=None) -> jax.Array:
    """One-sided periodogram P(f) = (2/n)|FFT(y - mean)|^2 at the FFT bins inside `freq_range` (last axis).

    With `length`, frames from `length` on are padding: the trace is zero-padded, so P is the periodogram of the
    first `length` frames sampled on the finer grid k/T (each value still has mean 2 s^2 for white noise).

    **Returns:** array (..., bins).
    """
    bins = _checked_band_bins(y.shape[-1], freq_range)
    yc, n = _masked_centred(y, length)
    # the band is a run of consecutive bins: a slice, not a gather (which took 60 % of a 256-pixel block's time)
    spec = jnp.fft.rfft(yc, axis=-1)[..., int(bins[0]) : int(bins[-1]) + 1]
    return (2.0 / n[..., None]) * (spec.real**2 + spec.imag**2)


def _band_statistic(P: jax.Array, method: str) -> jax.Array:
    """The per-trace statistic that is averaged (over chunks) before `_finish_noise`: mean P, median P / ln 2, or
    mean log P."""
    if method == "mean":
        return jnp.mean(P, axis=-1)
    if method == "median":
        return jnp.median(P, axis=-1) / math.log(2.0)
    return jnp.mean(jnp.log(P), axis=-1)


@functools.partial(jax.jit, static_argnums=(1,))
def _finish_noise(stat: jax.Array, method: str) -> jax.Array:
    """sn = sqrt(avg P / 2) from the averaged statistic of `_band_statistic`."""
    avg = jnp.exp(stat + EULER_GAMMA) if method == "logmexp" else stat
    return jnp.sqrt(avg / 2.0)


def _masked_statistic(P: jax.Array, keep: jax.Array, method: str) -> jax.Array:
    """`_band_statistic` over the bins where `keep` (broadcast against P) is True: the band may differ per trace."""
    keep = jnp.broadcast_to(keep, P.shape)
    count = jnp.sum(keep, axis=-1)
    if method == "mean":
        return jnp.sum(jnp.where(keep, P, 0), axis=-1) / count
    if method == "median":
        return jnp.nanmedian(jnp.where(keep, P, jnp.nan), axis=-1) / math.log(2.0)
    return jnp.sum(jnp.where(keep, jnp.log(jnp.where(keep, P, 1)), 0), axis=-1) / count


CUTOFF_DEAD = 3.0
"""Decades by which the spectrum must fall below its level over the octave below for `noise_cutoff` to call the
frequencies above empty (resampled / low-pass filtered data; calcium plus white noise falls at most ~1.2 decades per
octave, an AR(2) kernel's 1/f^4)."""
CUTOFF_EDGE = 1.0
"""Decades of fall (against the octave below) that place the cut-off's edge, once a cut-off has been detected."""


def _cutoff_bands(T: int) -> tuple[int, int]:
    """(number of bands, bins per band) that `noise_cutoff` averages the spectrum of a T-frame trace into: bins
    1 .. nb w, at least 8 bins per band and at most 256 bands (the cut-off placed to ~1/512 of the sampling rate)."""
    bins = T // 2
    nb = int(min(256, bins // 8))
    return nb, (bins // nb if nb else 0)


def _octave_below(nb: int) -> np.ndarray:
    """(nb, nb) mask: row j marks the bands i >= 1 with j // 2 <= i < j (the octave below band j)."""
    j = np.arange(nb)[:, None]
    i = np.arange(nb)[None, :]
    return (i >= np.maximum(1, j // 2)) & (i < j)


def _cutoff(y: jax.Array, length) -> jax.Array:
    """`noise_cutoff` along the last axis (jit-able; the band layout depends on the shape only)."""
    T = y.shape[-1]
    nb, w = _cutoff_bands(T)
    if nb < 4:
        return jnp.full(y.shape[:-1], 0.5, y.dtype)
    yc, n = _masked_centred(y, length)
    t = jnp.arange(T, dtype=y.dtype)
    window = jnp.where(t < n[..., None], jnp.sin(jnp.pi * (t + 0.5) / n[..., None]) ** 2, 0)  # Hann over the data
    P = jnp.abs(jnp.fft.rfft(yc * window, axis=-1)[..., 1 : 1 + nb * w]) ** 2
    level = jnp.mean(P.reshape(*P.shape[:-1], nb, w), axis=-1)
    tiny = jnp.finfo(y.dtype).tiny
    L = jnp.log10(level + tiny) - jnp.log10(jnp.max(level, axis=-1, keepdims=True) + tiny)
    M = _octave_below(nb)
    ref = jnp.nanmedian(jnp.where(M, L[..., None, :], jnp.nan), axis=-1)  # NaN for bands 0 and 1 (no octave)
    drop = jnp.where(jnp.asarray(M.any(axis=1)), ref - L, 0.0)
    j = jnp.arange(nb)
    first_dead = jnp.min(jnp.where(drop > CUTOFF_DEAD, j, nb), axis=-1)
    # the edge: the first band of the run of falling bands that reaches the first dead band
    last_level = jnp.max(jnp.where((drop <= CUTOFF_EDGE) & (j < first_dead[..., None]), j, 0), axis=-1)
    edge = (1 + last_level * w) / T  # its lower edge: the band it may share with the cut is left out
    return jnp.where(first_dead < nb, edge, 0.5).astype(y.dtype)


@jax.jit
def _noise_cutoff(y, length):
    return _cutoff(y, length)


def noise_cutoff(y, *, length=None) -> jax.Array:
    """Highest frequency that holds noise in each trace: 0.5 (Nyquist) unless the trace was low-pass filtered or resampled.

    White noise has a flat spectrum and calcium's falls at most like an AR(2) kernel's, 1/f^4 (~1.2 decades per
    octave); a spectrum that drops by more than `CUTOFF_DEAD` (3) decades below its level over the octave below is
    a filter's stop band (an upsampled trace holds nothing above the old Nyquist rate). The spectrum is the Hann-tapered
    periodogram (the taper keeps low-frequency power from leaking across the cut) averaged in equal frequency bands;
    the cut-off is the lower edge of the last band before the run of bands, ending in that drop, that lie more than
    `CUTOFF_EDGE` (1) decade below their octave (that band may hold the start of the cut, so it is left out). Along the last axis, any batch shape; jit-compiled.

    **Arguments:**
    - `y`: array (..., T) of traces.
    - `length`: optional per-trace number of valid frames (the rest is padding), as in `estimate_noise`.

    **Returns:** array of the batch shape: f_c as a fraction of the sampling rate, in (0, 0.5].
    """
    y = _to_float(y)
    if y.ndim == 0:
        raise ParameterError("noise_cutoff: y is a scalar; expected traces with frames along the last axis.")
    if length is not None:
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), y.shape[:-1])
    return _noise_cutoff(y, length)


@functools.partial(jax.jit, static_argnames=("method",))
def _estimate_noise_auto(y, length, method):
    """sn of the band-limited noise: the PSD level over [f_c/2, f_c] of each trace, times sqrt(2 f_c)."""
    fc = _cutoff(y, length)
    T = y.shape[-1]
    yc, n = _masked_centred(y, length)
    k = np.arange(T // 2 + 1)
    spec = jnp.fft.rfft(yc, axis=-1)
    P = (2.0 / n[..., None]) * (spec.real**2 + spec.imag**2)
    f = jnp.asarray(k / T, y.dtype)
    keep = (f >= fc[..., None] / 2) & (f <= fc[..., None]) & jnp.asarray((k > 0) & (2 * k < T))
    level = _finish_noise(_masked_statistic(P, keep, method), method)
    return level * jnp.sqrt(jnp.where(fc >= 0.5, 1.0, 2.0 * fc))


@functools.partial(jax.jit, static_argnames=("freq_range", "method"))
def _estimate_noise(y, length, freq_range, method):
    P = _band_periodogram(y, freq_range, length)
    return _finish_noise(_band_statistic(P, method), method)


def estimate_noise(y, *, freq_range=(0.25, 0.5), method: str = "logmexp", length=None) -> jax.Array:
    """Noise standard deviation of each trace, from its power spectral density at high frequencies.

    Along the last axis of `y` (any batch shape); jit-compiled, usable inside `jit`/`vmap`. With P(f) the one-sided
    periodogram (2/T)|FFT(y - mean y)|^2 at the bins with lo <= f <= hi (0 and Nyquist excluded), the average of P
    is its mean, its median / ln 2, or exp(mean log P + 0.5772) ("logmexp", robust to a few large values), and
    sn = sqrt(average / 2). Non-finite values give a non-finite result; a constant trace gives 0.

    With `freq_range="auto"` the band is chosen per trace from its spectrum: [f_c/2, f_c] with f_c = `noise_cutoff`
    (0.5 unless the trace was resampled or low-pass filtered, so (0.25, 0.5) for most data), and the result is the
    standard deviation of the noise as it is in the trace: white up to f_c, so sqrt(average / 2) * sqrt(2 f_c) (its
    variance is the PSD level times the band f_c it fills). That is the noise that the residual of a fit holds, and
    what `deconvolve`'s constraint ||y - c - b||^2 <= sn^2 T needs.

    **Arguments:**
    - `y`: array (..., T) of traces (integer input is treated as float32; otherwise the input dtype is kept).
    - `freq_range`: (lo, hi), fractions of the sampling rate, 0 <= lo < hi <= 0.5 (CaImAn's `noise_range`), or
      "auto" (see above).
    - `method`: "logmexp" (default), "mean" or "median" (CaImAn's `noise_method`).
    - `length`: optional int array broadcastable to the batch shape: only the first `length` frames of each trace are
      data (the rest, e.g. NaN padding, is ignored). Each length must be at least 4.

    **Returns:** array of the batch shape (...,) with the noise standard deviations.
    """
    auto = isinstance(freq_range, str) and freq_range == "auto"
    freq_range = _check_noise_args((0.25, 0.5) if auto else freq_range, method)
    y = _to_float(y)
    if y.ndim == 0:
        raise ParameterError("estimate_noise: y is a scalar; expected traces with frames along the last axis.")
    if length is not None:
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), y.shape[:-1])
    if auto:
        if y.shape[-1] < 4:
            raise ParameterError(f"estimate_noise: a trace of {y.shape[-1]} frames is too short; need at least 4.")
        return _estimate_noise_auto(y, length, method)
    return _estimate_noise(y, length, freq_range, method)


def _movie_chunks(T: int, chunk_frames: int) -> list[tuple[int, int, float]]:
    """Equal-length windows (start, stop, weight) covering 0..T: consecutive full windows, plus, when T is not a
    multiple, one last window ending at T (overlapping the previous one) weighted by the fraction of new frames."""
    L = min(int(chunk_frames), T)
    n_full = T // L
    windows = [(i * L, (i + 1) * L, 1.0) for i in range(n_full)]
    rest = T - n_full * L
    if rest:
        windows.append((T - L, T, rest / L))
    return windows


@functools.partial(jax.jit, static_argnames=("freq_range", "method"))
def _chunk_statistic(chunk, freq_range, method):
    """Per-pixel band statistic of one (frames, H, W) chunk."""
    y = jnp.moveaxis(chunk, 0, -1)
    return _band_statistic(_band_periodogram(y, freq_range), method)


NOISE_BLOCK = 1 << 22  # elements (16 MB of float32) per block of pixels of `estimate_noise_movie`


def _chunk_statistic_by_rows(chunk: np.ndarray, freq_range, method, block: int | None = None) -> np.ndarray:
    """`_chunk_statistic` of a (frames, H, W) chunk computed by blocks of image rows (each pixel's statistic needs
    only its own trace), so the transposed copy, spectrum and powers exist for one block at a time rather than for
    the whole chunk. Returns float64 (H, W). Blocks have one shape (the last one overlaps the one before)."""
    from ._threads import thread_map
    from .init import release_free_memory

    n, H, W = chunk.shape
    block = NOISE_BLOCK if block is None else block
    rows = int(min(H, max(1, block // max(1, n * W))))
    stat = np.empty((H, W), np.float64)

    def one(r0):
        part = jnp.asarray(chunk[:, r0 : r0 + rows])
        stat[r0 : r0 + rows] = np.asarray(_chunk_statistic(part, freq_range, method), np.float64)

    # blocks are dispatched from a thread per core: XLA's CPU FFT of one block runs on one core, and two blocks at
    # once took the noise of 256x256x3000 from 1.7 to 1.2 s on 2 cores (the same values: blocks are independent)
    starts = sorted({min(r, H - rows) for r in range(0, H, rows)})
    thread_map(one, starts)
    release_free_memory()  # else the C heap keeps the freed blocks (fragmentation)
    return stat


DFT_COST_LIMIT = 400
"""Flops per frame and pixel up to which a window goes through the two-stage band DFT (`_dft_plan`) rather than the
FFT (`_chunk_statistic_by_rows`): on one core the DFT's matrix products ran at ~70 flops/ns and the FFT path took
~6 ns per pixel and frame (256x256x1000 windows), so the DFT is the faster one below ~400 flops per frame."""


def _dft_factor(L: int, n_bins: int) -> int | None:
    """The split L = N1 N2 of the two-stage band DFT with the fewest flops per frame, 2 N1 (stage 1: an N1-point real
    DFT per N1 frames) + 8 n_bins / N1 (stage 2: n_bins complex bins from N2 complex values each, per L frames);
    None when even the best split costs more than `DFT_COST_LIMIT` (L prime or nearly so: the FFT is faster)."""
    cost = {d: 2 * d + 8 * n_bins / d for d in range(1, L + 1) if L % d == 0}
    N1 = min(cost, key=cost.get)
    return N1 if cost[N1] <= DFT_COST_LIMIT else None


def _stage1_rows(N1: int) -> list[tuple[int, bool]]:
    """(k1, imaginary?) for the rows of stage 1: Re and Im of the real N1-point DFT at k1 = 0..N1//2, without the
    imaginary parts that are exactly 0 (k1 = 0 and, for even N1, N1/2): N1 rows in all."""
    return [(k1, im) for k1 in range(N1 // 2 + 1) for im in (False, True) if not (im and 2 * k1 % N1 == 0)]


@functools.lru_cache(maxsize=16)
def _dft_plan(L: int, freq_range: tuple[float, float]):
    """Matrices of the band DFT of L-frame windows, or None where the FFT is faster (`_dft_factor`).

    With t = N2 n1 + n2, X[k] = sum_n2 e^(-2 pi i n2 k / L) S[k mod N1, n2], S[k1, n2] = sum_n1 x[t] e^(-2 pi i n1 k1
    / N1) (Cooley-Tukey with the twiddles folded into stage 2). The window (L, pixels) viewed as (N1, N2, pixels) is
    stage 1's input as it lies in memory (no transpose), and stage 2 computes only the band's bins: for each k1 <=
    N1/2, the bins with k mod N1 = k1 or N1 - k1 (S[N1 - k1] = conj S[k1] for real x) from S[k1]'s rows.

    **Returns:** (N1, A1 (N1, N1) float32 stage-1 matrix, groups): each group (r0, r1, M, n) takes stage-1 rows
    r0:r1 (Re S[k1], then Im S[k1] unless it is 0) and gives, from M (2 n, (r1 - r0) N2) float32, the Re (first n
    rows) and Im (last n) of n band bins (float64 angles, reduced mod L, rounded once).
    """
    bins = _checked_band_bins(L, freq_range)
    N1 = _dft_factor(L, bins.size)
    if N1 is None:
        return None
    N2 = L // N1
    rows = _stage1_rows(N1)
    n1 = np.arange(N1)
    phase = [2 * np.pi * (k1 * n1 % N1) / N1 for k1, _ in rows]
    A1 = np.stack([-np.sin(a) if im else np.cos(a) for a, (_, im) in zip(phase, rows)])
    n2 = np.arange(N2)
    groups = []
    for k1 in range(N1 // 2 + 1):
        ks = bins[(bins % N1 == k1) | (bins % N1 == (N1 - k1) % N1)]
        if ks.size == 0:
            continue
        r = [i for i, (k, _) in enumerate(rows) if k == k1]
        sign = np.where(ks % N1 == k1, 1.0, -1.0)[:, None]  # -1: S[k mod N1] = conj S[k1]
        angle = 2 * np.pi * (np.outer(ks, n2) % L) / L
        c, s = np.cos(angle), -np.sin(angle)  # e^(-i angle) = c + i s
        # (c + i s)(a + i sign b) = (c a - sign s b) + i (s a + sign c b)
        M = np.block([[c, -sign * s], [s, sign * c]]) if len(r) == 2 else np.vstack([c, s])
        groups.append((r[0], r[-1] + 1, M.astype(np.float32), ks.size))
    return N1, A1.astype(np.float32), tuple(groups)


def _block_power(X3: np.ndarray, p0: int, plan, S: np.ndarray, Z: list, P: np.ndarray) -> bool:
    """|X[k]|^2 of the band's bins for the pixels p0:p0 + Pb of a window X3 (N1, N2, pixels), into P (bins, Pb).
    S (N1, N2, Pb) and Z (one (2 n, Pb) per group) are scratch. The window's mean is taken out of stage 1's k1 = 0
    row (where all of it lies), as `estimate_noise` centres each trace.

    **Returns:** whether every pixel's sum over the window is finite (False: a non-finite frame, or an overflow).
    """
    N1, A1, groups = plan
    Pb = S.shape[-1]
    np.matmul(A1, X3[:, :, p0 : p0 + Pb].transpose(1, 0, 2), out=S.transpose(1, 0, 2))
    sums = S[0].sum(axis=0)
    S[0] -= sums / S.shape[1]
    r = 0
    for (r0, r1, M, n), z in zip(groups, Z):
        np.matmul(M, S[r0:r1].reshape(-1, Pb), out=z)
        np.square(z, out=z)
        np.add(z[:n], z[n:], out=P[r : r + n])
        r += n
    return bool(np.isfinite(sums).all())


def _power_statistic(P: np.ndarray, L: int, method: str) -> np.ndarray:
    """`_band_statistic` (float64 (Pb,)) of the periodogram (2/L) P of a block, P (bins, Pb) = |X|^2; P is
    overwritten."""
    if method == "mean":
        return np.mean(P, axis=0, dtype=np.float64) * (2.0 / L)
    if method == "median":
        return np.median(P, axis=0).astype(np.float64) * (2.0 / L) / math.log(2.0)
    return np.mean(np.log(P, out=P), axis=0, dtype=np.float64) + math.log(2.0 / L)


def _dft_statistic(chunk: np.ndarray, plan, method: str, block: int | None = None) -> tuple[np.ndarray, bool]:
    """`_chunk_statistic` of a (frames, H, W) window by the band DFT of `_dft_plan`, over blocks of pixels (the last
    one overlapping the one before), in float32 with a float64 statistic.

    Blocks of `NOISE_BLOCK` / 2 elements of window (2,097 pixels of 1,000 frames): on one core a 256x256x1000 window
    took 129-145 ms for blocks of 524 to 4,194 pixels and N1 = 20, 25 or 40 alike (the FFT path: 410 ms). One host
    thread: OpenBLAS spreads the products over the cores itself (256x256x3000 on 2 cores: 0.34-0.37 s, one core 0.44
    s); a thread per core on top of it oversubscribed them (2.5-15 s).

    **Returns:** (statistic (H, W) float64, whether every pixel's sum over the window is finite).
    """
    L, H, W = chunk.shape
    N1, A1, groups = plan
    X3 = np.asarray(chunk, np.float32).reshape(N1, L // N1, H * W)
    Pb = min(H * W, max(1, (NOISE_BLOCK if block is None else block) // (2 * L)))
    S = np.empty((N1, L // N1, Pb), np.float32)
    Z = [np.empty((2 * g[3], Pb), np.float32) for g in groups]
    P = np.empty((sum(g[3] for g in groups), Pb), np.float32)
    stat = np.empty(H * W, np.float64)
    finite = True
    with np.errstate(all="ignore"):  # as in jax: log 0 = -inf (constant pixels: sn 0), overflow to inf
        for p0 in sorted({min(p, H * W - Pb) for p in range(0, H * W, Pb)}):
            finite &= _block_power(X3, p0, plan, S, Z, P)
            stat[p0 : p0 + Pb] = _power_statistic(P, L, method)
    return stat.reshape(H, W), finite


def _window_statistic(chunk: np.ndarray, freq_range, method: str) -> tuple[np.ndarray | None, bool]:
    """Band statistic of one window (float64 (H, W)) and whether all its values are finite (else the statistic is
    None or meaningless): on the CPU backend the host band DFT where `_dft_plan` has a plan for the window's length,
    else (and on GPU/TPU, where XLA's FFT of the window is the fast path) the FFT."""
    plan = _dft_plan(chunk.shape[0], freq_range) if jax.default_backend() == "cpu" else None
    if plan is None:
        if not np.isfinite(chunk).all():
            return None, False
        return _chunk_statistic_by_rows(chunk, freq_range, method), True
    stat, sums_finite = _dft_statistic(chunk, plan, method)
    return stat, sums_finite or bool(np.isfinite(chunk).all())


def _read_window(movie, start: int, stop: int) -> np.ndarray:
    if isinstance(movie, np.ndarray):
        return np.asarray(movie[start:stop], dtype=np.float32)
    return movie.read(start, stop)


def estimate_noise_movie(
    movie, *, chunk_frames: int = 1000, freq_range=(0.25, 0.5), method: str = "logmexp"
) -> np.ndarray:
    """Noise standard deviation of every pixel of a movie, streamed over chunks of frames (Welch-style).

    The movie is read in windows of `chunk_frames` frames (the last window ends at the last frame and overlaps the
    one before it, weighted by the fraction of its frames that are new), so it is never whole in memory. Each window
    gives each pixel the statistic of `estimate_noise` (mean of P, median of P / ln 2, or mean of log P); these are
    averaged over windows (each is an unbiased estimate of the same quantity for noise) and turned into sn. The band's
    bins come from a two-stage DFT by matrix products on the window as it lies in memory (`_dft_plan`; the FFT when
    the window length is prime or nearly so): warm, on 256x256x3000 float32 with one core, 0.44 s for "logmexp"
    (the FFT of transposed blocks took 1.23 s), 0.40 s for "mean" (1.29 s), 1.0 s for "median" (7.0 s).

    **Arguments:**
    - `movie`: a path (anything `jaxcnmf.io.open_movie` reads), a `MovieSource`, or an array (T, H, W).
    - `chunk_frames`: frames per window (at least 8; the whole movie if it is shorter).
    - `freq_range`, `method`: as in `estimate_noise`.

    **Returns:** float32 numpy array (H, W): sn per pixel (CaImAn's `sn`).
    """
    freq_range = _check_noise_args(freq_range, method)
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, (int, np.integer)) or chunk_frames < 8:
        raise ParameterError(f"chunk_frames={chunk_frames!r}: expected an integer of at least 8 frames per chunk.")
    source = _as_movie(movie)
    T, H, W = source.shape
    total = np.zeros((H, W), np.float64)
    for start, stop, weight in _movie_chunks(T, chunk_frames):
        stat, finite = _window_statistic(_read_window(source, start, stop), freq_range, method)
        if not finite:
            raise MovieError(
                f"estimate_noise_movie: {_name(movie)} has non-finite values in frames {start}..{stop - 1}; "
                "repair them first (jaxcnmf.io.open_movie(..., nonfinite='repair'))."
            )
        total += weight * stat
    stat = total / (T / min(int(chunk_frames), T))
    return np.asarray(_finish_noise(stat, method), np.float32)


def _name(movie) -> str:
    path = getattr(movie, "path", None)
    if isinstance(movie, (str, bytes)) or hasattr(movie, "__fspath__"):
        path = str(movie)
    return repr(path) if path else "the movie"


def _as_movie(movie):
    """A `MovieSource` or a (T, H, W) numpy array, checked to have enough frames."""
    if isinstance(movie, (np.ndarray, jax.Array)) or (
        not hasattr(movie, "read") and not isinstance(movie, (str, bytes)) and not hasattr(movie, "__fspath__")
    ):
        arr = np.asarray(movie)
        if arr.ndim != 3:
            raise MovieError(f"estimate_noise_movie: expected a movie array (T, H, W), got shape {arr.shape}.")
        source = arr
        T = arr.shape[0]
    elif hasattr(movie, "read") and hasattr(movie, "shape"):
        source = movie
        T = movie.shape[0]
    else:
        from .io import open_movie

        source = open_movie(movie, min_frames=8)
        T = source.shape[0]
    if T < 8:
        raise MovieError(f"estimate_noise_movie: {_name(movie)} has {T} frames; need at least 8 to estimate noise.")
    return source


# ----------------------------------------------------------------------------------------------------------------------
# AR kinetics


def _autocovariance(y: jax.Array, max_lag: int, length=None) -> jax.Array:
    """Biased autocovariance r(k) = (1/n) sum_t yc_t yc_{t+k}, k = 0..max_lag, of the mean-removed trace (last axis)."""
    yc, n = _masked_centred(y, length)
    T = y.shape[-1]
    r = [jnp.sum(yc[..., : T - k] * yc[..., k:], axis=-1) for k in range(max_lag + 1)]
    return jnp.stack(r, axis=-1) / n[..., None]


def _noise_autocovariance(sn2: jax.Array, fc: jax.Array, max_lag: int) -> jax.Array:
    """Autocovariance at lags 0..max_lag of noise of variance sn2 that is white up to the cut-off fc (fraction of the
    sampling rate): sn2 sinc(2 fc k), i.e. sn2 at lag 0 and exactly 0 elsewhere for white noise (fc = 0.5)."""
    k = jnp.arange(max_lag + 1, dtype=sn2.dtype)
    return sn2[..., None] * jnp.where(fc[..., None] >= 0.5, (k == 0).astype(sn2.dtype), jnp.sinc(2 * fc[..., None] * k))


def _yule_walker_lstsq(r: jax.Array, rn: jax.Array, sn2: jax.Array, n: jax.Array, p: int, m=None) -> jax.Array:
    """Least-squares solution of r_c(k) = sum_j g_j r_c(|k-j|), k = 1..m, for the calcium's autocovariance
    r_c = r - rn (the noise's autocovariance removed; r_c(0) kept >= 0) (one trace).

    The fit is ridge-regularised with weight m sn^4 / n, the sampling variance that white noise alone puts on m
    autocovariances of an n-frame trace: negligible when the calcium stands out of the noise, it shrinks g towards
    0 when it does not (white noise), where the plain least-squares problem is ill-posed. `m` (traced, <= the lags
    in r) uses the first m equations only; None: all of them.
    """
    rows = r.shape[-1] - 1
    rc = r - rn
    rc = rc.at[0].set(jnp.maximum(rc[0], 0.0))
    k = np.arange(1, rows + 1)[:, None]
    j = np.arange(1, p + 1)[None, :]
    active = jnp.ones(rows, r.dtype) if m is None else (jnp.arange(1, rows + 1) <= m).astype(r.dtype)
    M = rc[np.abs(k - j)] * active[:, None]
    m = rows if m is None else m
    ridge = m * sn2 * sn2 / n + jnp.finfo(r.dtype).tiny
    # the ridge problem as one stacked least-squares system (SVD), not its normal equations: on traces whose
    # autocovariance is nearly flat over the lags (slow drift, upsampled data) M'M is singular in float32
    A = jnp.concatenate([M, jnp.sqrt(ridge) * jnp.eye(p, dtype=r.dtype)])
    b = jnp.concatenate([rc[1:] * active, jnp.zeros(p, r.dtype)])
    return jnp.linalg.lstsq(A, b)[0]


AUTO_LAGS = (5, 60)
"""Fewest and most extra lags of `estimate_ar(lags="auto")`."""


def _decay_lags(r: jax.Array, rn: jax.Array, sn2: jax.Array, n: jax.Array, min_root: float, max_root: float):
    """Extra lags for `lags="auto"` (one trace): the decay time in frames of the AR(1) fit over the fewest lags,
    clipped to `AUTO_LAGS`."""
    lo, hi = AUTO_LAGS
    d = _yule_walker_lstsq(r, rn, sn2, n, 1, m=1 + lo)[0]
    d = jnp.clip(d, min_root, max_root)
    return jnp.clip(jnp.ceil(-1.0 / jnp.log(d)), lo, hi).astype(jnp.int32)


def _safe_sqrt(x):
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def ar_roots(g) -> jax.Array:
    """Roots of z^p - g_1 z^(p-1) - ... - g_p for p = 1 or 2, largest first; a complex pair gives its real part twice.

    **Arguments:**
    - `g`: array (..., p) of AR coefficients.

    **Returns:** array (..., p) of real roots (the decay factors per frame).
    """
    g = jnp.asarray(g)
    if g.shape[-1] == 1:
        return g
    g1, g2 = g[..., 0], g[..., 1]
    half = _safe_sqrt(g1 * g1 + 4.0 * g2) / 2.0
    return jnp.stack([g1 / 2.0 + half, g1 / 2.0 - half], axis=-1)


def _roots_to_ar(roots: jax.Array) -> jax.Array:
    """g from the roots; for p = 2, g_2 is kept at or above -g_1^2/4 so that rounding cannot make the rebuilt roots of
    two (nearly) equal real roots complex."""
    if roots.shape[-1] == 1:
        return roots
    d, r = roots[..., 0], roots[..., 1]
    g1 = d + r
    return jnp.stack([g1, jnp.maximum(-d * r, -(g1 * g1) / 4)], axis=-1)


def guard_ar(g, *, min_root: float = 1e-3, max_root: float = 0.999) -> jax.Array:
    """Nearest stable, decaying, non-oscillating AR kernel, by a fixed rule on the roots.

    The rule: (1) a complex pair r e^(+-i theta) (an oscillating kernel) is replaced by a double real root at its real
    part g_1/2 (same sum of roots: g_2 is moved to the boundary -g_1^2/4); (2) each real root is clipped into
    [min_root, max_root] (a negative root alternates sign, a root >= 1 does not decay, a root of 0 is not a kernel
    that `deconvolve` accepts); (3) g is rebuilt from the roots. A kernel with roots inside the range is returned
    unchanged. No Python branching on values (jit/vmap safe).

    **Arguments:**
    - `g`: array (..., p), p = 1 or 2.
    - `min_root`: the smallest allowed root; 1e-3 is a decay time of 0.14 frames (no memory: white calcium).
    - `max_root`: the largest allowed root (decay factor per frame); 0.999 is a decay time of 1000 frames.

    **Returns:** array (..., p) with roots in [min_root, max_root].
    """
    g = jnp.asarray(g)
    return _roots_to_ar(jnp.clip(ar_roots(g), min_root, max_root))


@functools.partial(jax.jit, static_argnames=("p", "lags", "min_root", "max_root"))
def _estimate_ar(y, sn, fc, length, p, lags, min_root, max_root):
    auto = lags == "auto"
    top = p + (AUTO_LAGS[1] if auto else lags)
    r = _autocovariance(y, top, length)
    batch = r.shape[:-1]
    n = jnp.broadcast_to(jnp.asarray(y.shape[-1] if length is None else length, y.dtype), batch)
    rn = _noise_autocovariance(sn * sn, fc, top)

    def one(ri, rni, si, ni):
        m = p + _decay_lags(ri, rni, si * si, ni, min_root, max_root) if auto else None
        return _yule_walker_lstsq(ri, rni, si * si, ni, p, m=m)

    g = jax.vmap(one)(r.reshape(-1, top + 1), rn.reshape(-1, top + 1), sn.reshape(-1), n.reshape(-1))
    return guard_ar(g.reshape(*batch, p), min_root=min_root, max_root=max_root)


def estimate_ar(
    y,
    p: int = 2,
    *,
    sn=None,
    lags: int = 5,
    min_root: float = 1e-3,
    max_root: float = 0.999,
    length=None,
    noise_cutoff=0.5,
) -> jax.Array:
    """AR(p) coefficients of the calcium in noisy traces: Yule-Walker on the noise-corrected autocovariance.

    The autocovariance r(k) (k = 0..p+lags) of the mean-removed trace has the white-noise variance only at lag 0, so
    with r_c(0) = r(0) - sn^2 the equations r(k) = sum_j g_j r_c(|k-j|), k = 1..p+lags, are solved in least squares,
    then `guard_ar` makes the kernel stable, decaying and non-oscillating (roots real, in [min_root, max_root]). Along the
    last axis of `y`, any batch shape; jit-compiled, usable inside `jit`/`vmap`. Noise that is white only up to a
    cut-off f_c < 0.5 (resampled or filtered traces, see `noise_cutoff`) is correlated over ~1/(2 f_c) frames: its
    autocovariance sn^2 sinc(2 f_c k) is then removed at every lag, not at lag 0 only.

    **Arguments:**
    - `y`: array (..., T) of traces.
    - `p`: 1 or 2, the AR order (CaImAn's `p`).
    - `sn`: noise standard deviation per trace (batch shape); estimated with `estimate_noise` when None.
    - `lags`: number of extra lags beyond p in the least-squares fit (CaImAn's `lags`), or "auto": as many as the
      calcium's decay time in frames (from an AR(1) fit over 5 extra lags), clipped to `AUTO_LAGS` (5..60), so the
      fitted lags span the decay whatever the frame rate (5 lags are 40 ms at 122 Hz, where the autocovariance of a
      0.5 s decay is still flat).
    - `min_root`, `max_root`: smallest and largest allowed roots (see `guard_ar`).
    - `length`: optional per-trace number of valid frames (the rest is padding), as in `estimate_noise`.
    - `noise_cutoff`: the frequency (fraction of the sampling rate, per trace or one value) up to which the noise is
      white, as `noise_cutoff` returns it; 0.5 (default) is white noise. `sn` is then the standard deviation of that
      band-limited noise (as `estimate_noise(..., freq_range="auto")` gives it).

    **Returns:** array (..., p) of AR coefficients g.
    """
    if p not in (1, 2):
        raise ParameterError(f"p={p!r}: only AR(1) and AR(2) kernels are supported (p=1 or p=2).")
    auto = isinstance(lags, str) and lags == "auto"
    if not auto and (isinstance(lags, bool) or not isinstance(lags, (int, np.integer)) or lags < 0):
        raise ParameterError(f"lags={lags!r}: expected a non-negative integer number of extra lags, or 'auto'.")
    if not 0.0 < float(min_root) <= float(max_root) < 1.0:
        raise ParameterError(f"min_root={min_root!r}, max_root={max_root!r}: expected 0 < min_root <= max_root < 1.")
    y = _to_float(y)
    need = p + (AUTO_LAGS[1] if auto else lags) + 2
    if y.ndim == 0 or y.shape[-1] < need:
        raise ParameterError(
            f"estimate_ar: traces of shape {y.shape} are too short for p={p} with lags={lags}; "
            f"need at least {need} frames."
        )
    if length is not None:
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), y.shape[:-1])
    if sn is None:
        sn = estimate_noise(y, length=length)
    sn = jnp.broadcast_to(jnp.asarray(sn, y.dtype), y.shape[:-1])
    fc = jnp.broadcast_to(jnp.asarray(noise_cutoff, y.dtype), y.shape[:-1])
    return _estimate_ar(y, sn, fc, length, int(p), "auto" if auto else int(lags), float(min_root), float(max_root))


# ----------------------------------------------------------------------------------------------------------------------
# kinetics in seconds


def _is_zero_or_none(x) -> bool:
    if x is None:
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    return bool(np.all(np.asarray(x) == 0))


def tau_to_ar(tau_decay, tau_rise=None, fps: float = 1.0, *, p: int | None = None) -> jax.Array:
    """AR coefficients of a kernel with the given decay (and rise) time in seconds.

    AR(1): g = exp(-1 / (tau_decay fps)). AR(2): roots d = exp(-1/(tau_decay fps)), r = exp(-1/(tau_rise fps)),
    g = (d + r, -d r). A time of 0 gives a root of 0.

    **Arguments:**
    - `tau_decay`: decay time constant(s) in seconds (scalar or array).
    - `tau_rise`: rise time constant(s) in seconds; None or 0 gives AR(1) unless `p=2` is asked for.
    - `fps`: frame rate in Hz.
    - `p`: force the order (1 or 2); by default 1 when `tau_rise` is None or 0, else 2.

    **Returns:** array (..., p) of AR coefficients.
    """
    if p is None:
        p = 1 if _is_zero_or_none(tau_rise) else 2
    if p not in (1, 2):
        raise ParameterError(f"p={p!r}: only AR(1) and AR(2) kernels are supported (p=1 or p=2).")
    if p == 1 and not _is_zero_or_none(tau_rise):
        raise ParameterError(f"tau_rise={tau_rise!r} with p=1: an AR(1) kernel has no rise time; use p=2.")
    tau_decay = _to_float(tau_decay)
    root = lambda tau: jnp.exp(-1.0 / (jnp.asarray(tau, tau_decay.dtype) * fps))  # noqa: E731  tau = 0 -> root 0
    d = root(tau_decay)
    if p == 1:
        return d[..., None]
    r = root(0.0 if tau_rise is None else tau_rise)
    d, r = jnp.broadcast_arrays(d, r)
    return _roots_to_ar(jnp.stack([d, r], axis=-1))


def ar_to_tau(g, fps: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Decay and rise times in seconds of an AR(1) or AR(2) kernel (the inverse of `tau_to_ar`).

    tau = -1 / (fps log root) for each root (a root of 0 gives 0); for AR(1) the rise time is 0. The kernel should
    be valid (roots real in [0, 1), e.g. from `estimate_ar` or `guard_ar`); a complex pair is read as its real part.

    **Arguments:**
    - `g`: array (..., p), p = 1 or 2.
    - `fps`: frame rate in Hz.

    **Returns:** (tau_decay, tau_rise), arrays of the batch shape.
    """
    g = _to_float(g)
    if g.ndim == 0:
        g = g[None]
    if g.shape[-1] not in (1, 2):
        raise ParameterError(f"g of shape {g.shape}: expected AR coefficients (..., p) with p = 1 or 2.")
    roots = ar_roots(g)
    tau = -1.0 / (fps * jnp.log(roots))
    if g.shape[-1] == 1:
        return tau[..., 0], jnp.zeros_like(tau[..., 0])
    return tau[..., 0], tau[..., 1]


__all__ = [
    "estimate_noise",
    "noise_cutoff",
    "estimate_noise_movie",
    "estimate_ar",
    "guard_ar",
    "ar_roots",
    "tau_to_ar",
    "ar_to_tau",
]
