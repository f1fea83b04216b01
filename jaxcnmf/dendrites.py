"""Starting points for dendritic and axonal imaging: event-triggered sparse rank-1 components (no blob shape assumed).

First stage of the pipeline for `fit(..., init="dendrite")`: a movie (T,H,W) in, thin branching footprints A (d,K),
traces C (K,T) and a background b f out, which the non-compact spatial update and the unchanged temporal update refine.

The idea (sparse activity, no shape prior): after removing each pixel's median and the spatially smooth background
and neuropil, a component's strongest event is, at its peak frame, usually the only event in the pixels it covers.
The pixels significantly active at that frame are therefore a clean first footprint even where processes cross
(where a whole-trace start would mix the two crossing processes). Each footprint is then refined by a sparse
rank-1 fit on the whole field, keeping only pixels whose projection on the trace is significant against the noise
(and has a significant neighbour, so a one-pixel-wide branch survives but isolated noise pixels do not), subtracted
from the residual, and the search repeats until no event is left above the noise. Candidates are refined in batches
(jit + matrix products over a fixed number of seeds per round), so the cost is a few passes over the movie per round.
A branch with its own events also carries its process's back-propagating ones, so a start seeded on the branch can
hold both (the model is degenerate there); `peel_shared_activity` moves the shared part onto the process, so the
fit's merging does not fold the branch back into it.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .errors import ParameterError
from .init import InitResult, _as_movie, background_hals, gaussian_blur, gaussian_kernel1d, hals_rows
from .init import _taps_along as _taps
from .noise import estimate_noise

__all__ = ["dendrite_init", "highpass_movie", "significant_support", "default_peak_threshold",
           "peel_shared_activity"]


# ------------------------------------------------------------------------------------------------- preprocessing


@partial(jax.jit, static_argnames=("tsub",))
def _bin_frames(Y: jax.Array, tsub: int) -> jax.Array:
    """Average consecutive groups of `tsub` frames of a (T, ...) stack (a trailing partial group is dropped)."""
    n = Y.shape[0] // tsub
    return Y[: n * tsub].reshape((n, tsub) + Y.shape[1:]).mean(axis=1)


@jax.jit
def highpass_movie(frames: jax.Array, median: jax.Array, kernel: jax.Array) -> jax.Array:
    """Each frame minus the pixel medians, minus its own Gaussian blur (a spatial high-pass, normalised at the edges).

    Thin processes (a few pixels wide) pass almost unchanged; the smooth background and the neuropil, which vary over
    tens of pixels, are removed.

    **Arguments:** `frames` (T, H, W); `median` (H, W) per-pixel temporal median; `kernel` (k,) 1-D Gaussian taps.

    **Returns:** (T, H, W) high-passed frames, same dtype.
    """
    x = frames - median
    norm = gaussian_blur(jnp.ones(median.shape, x.dtype), kernel)
    return x - gaussian_blur(x, kernel) / norm


def default_peak_threshold(n_samples: float) -> float:
    """Largest value that unit Gaussian noise reaches about once among `n_samples` independent samples.

    Solves n P(X > u) = 1 with the tail bound P(X > u) ~ exp(-u^2/2) / (u sqrt(2 pi)) by a few fixed-point steps
    (about 5.0 for 4e6 samples). Used as the smallest peak SNR that starts a component.

    **Arguments:** `n_samples`: number of (roughly independent) noise samples searched.

    **Returns:** the threshold u (>= 1).
    """
    n = max(float(n_samples), 2.0)
    u = math.sqrt(2 * math.log(n))
    for _ in range(20):
        u = math.sqrt(max(2 * math.log(n / (u * math.sqrt(2 * math.pi))), 1.0))
    return u


# ------------------------------------------------------------------------------------------------- footprints


def significant_support(proj: jax.Array, shape: tuple[int, int], z: float) -> jax.Array:
    """Pixels whose whitened projection exceeds `z` AND have at least one 8-neighbour that does too.

    A one-pixel-wide line keeps every pixel (each has a neighbour on the line), so branches are not cut; a noise pixel
    alone above `z` (probability ~ 1e-3 each) rarely has a significant neighbour as well (~ 1e-5).

    **Arguments:** `proj` (d, B) whitened projections (unit noise), d = H*W row-major; `shape` (H, W); `z` threshold.

    **Returns:** bool (d, B).
    """
    H, W = shape
    B = proj.shape[1]
    m = (proj > z).T.reshape(B, H, W).astype(proj.dtype)
    box = jnp.ones((3,), proj.dtype)
    n = _taps(_taps(m, box, -1), box, -2)  # 3x3 box sum, including the pixel itself
    keep = (m > 0) & (n >= 2)
    return keep.reshape(B, H * W).T


def _box_smooth(Z: jax.Array, w: int) -> jax.Array:
    """Moving sum over `w` frames along the last axis, divided by sqrt(w) (unit white noise stays unit)."""
    if w <= 1:
        return Z
    cs = jnp.concatenate([jnp.zeros_like(Z[:, :1]), jnp.cumsum(Z, axis=1)], axis=1)
    s = cs[:, w:] - cs[:, :-w]
    return s / math.sqrt(w)


def _masked_box(frames: jax.Array, mask: jax.Array, half: int) -> jax.Array:
    """Sum of `frames` (T, H, W) over the `mask` (H, W) pixels of each (2 half + 1)^2 window, divided by the square
    root of their count: white unit noise stays unit, and a signal spread along the masked structure adds up."""
    box = jnp.ones((2 * half + 1,), frames.dtype)
    m = mask.astype(frames.dtype)
    num = _taps(_taps(frames * m, box, -1), box, -2)
    cnt = _taps(_taps(m, box, -1), box, -2)
    return num / jnp.sqrt(jnp.maximum(cnt, 1.0))


@partial(jax.jit, static_argnames=("shape", "n_seeds", "n_iter", "smooth", "sep", "half"))
def _candidates(Z, exhausted, known, thr, z, blur, *, shape, n_seeds, n_iter, smooth, sep, half):
    """One round of the search on the whitened residual Z (d, T): seeds, event footprints, batched rank-1 refinement.

    Events are scored on Z smoothed over `smooth` frames and, in space, by a small Gaussian (a matched filter for a
    thin line, scaled to unit noise) or, on the pixels `known` to belong to components already found, by the masked
    box sum of `_masked_box` (the search follows the known shapes, where weak branch-local events hide).

    **Returns:** `(a, c, peak, seeds)`: a (d, B) whitened footprints (zero off their significant support), c (B, T)
    >= 0, peak (B,) each seed's scored peak SNR (0 where no seed was found above `thr`), seeds (B,) pixel indices.
    """
    H, W = shape
    d, T = Z.shape
    Zs = _box_smooth(Z, smooth).T.reshape(-1, H, W)
    Zb = gaussian_blur(Zs, blur) / jnp.sum(blur**2)  # separable blur: noise sd is (sum k^2)^(1/2 * 2)
    Zk = _masked_box(Zs, known.reshape(H, W), half)
    Zeff = jnp.where(known.reshape(H, W), jnp.maximum(Zk, Zb), Zb).reshape(-1, d).T
    score = jnp.max(Zeff, axis=1)
    score = jnp.where(exhausted, 0.0, score)
    img = score.reshape(H, W)
    local = lax.reduce_window(img, -jnp.inf, lax.max, (2 * sep + 1, 2 * sep + 1), (1, 1), "SAME")
    peaks = jnp.where((img >= local) & (img > thr), img, 0.0).reshape(d)
    peak, seeds = lax.top_k(peaks, n_seeds)
    ok = peak > 0
    t_star = jnp.argmax(Zeff[seeds], axis=1)
    a = Zeff[:, t_star]  # (d, B): the frame of each seed's strongest event
    a = jnp.where(significant_support(a, shape, z) & ok[None, :], a, 0.0)

    def step(_, a):
        na2 = jnp.maximum(jnp.sum(a * a, axis=0), 1e-12)
        c = jnp.maximum((a.T @ Z) / na2[:, None], 0.0)
        nc = jnp.sqrt(jnp.maximum(jnp.sum(c * c, axis=1), 1e-12))
        proj = (Z @ c.T) / nc[None, :]  # unit noise under the null
        return jnp.where(significant_support(proj, shape, z), proj / nc[None, :], 0.0)

    a = lax.fori_loop(0, n_iter, step, a)
    na2 = jnp.maximum(jnp.sum(a * a, axis=0), 1e-12)
    c = jnp.maximum((a.T @ Z) / na2[:, None], 0.0)
    return a, c, jnp.where(ok, peak, 0.0), seeds


@partial(jax.jit, donate_argnums=(0,))
def _subtract(Z, a, c):
    return Z - a @ c


@partial(jax.jit, static_argnames=("n_iter",))
def _hals_supported(Z, A, C, support, n_iter):
    """Joint non-negative least squares refinement of Z ~ A C, each column of A kept on its `support` (HALS)."""

    def sweep(_, AC):
        A, C = AC
        C = hals_rows(C, A.T @ Z, A.T @ A)
        A = hals_rows(A.T, (Z @ C.T).T, C @ C.T, keep=support.T).T
        return A, C

    return lax.fori_loop(0, n_iter, sweep, (A, C))


@partial(jax.jit, static_argnames=("n_iter",))
def _hals_traces(AtR, AtA, C, n_iter):
    """Non-negative least-squares traces for fixed footprints from A'R (K, T) and A'A (K, K) by HALS sweeps."""
    return lax.fori_loop(0, n_iter, lambda _, C: hals_rows(C, AtR, AtA), C)


@jax.jit
def _project_chunk(frames, median, kernel, A):
    """A' (high-passed frames) for one chunk: (K, t)."""
    x = highpass_movie(frames, median, kernel)
    t = x.shape[0]
    return A.T @ x.reshape(t, -1).T


def _dilate_cross(mask: np.ndarray, shape, n: int) -> np.ndarray:
    """Binary dilation of (d, K) masks by a 3x3 cross, `n` times (a shape-following band around each support)."""
    from scipy import ndimage

    H, W = shape
    K = mask.shape[1]
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    m = mask.T.reshape(K, H, W)
    if n > 0 and K:
        m = ndimage.binary_dilation(m, st, iterations=n)
    return m.reshape(K, H * W).T


# ------------------------------------------------------------------------------------------------- the start


def dendrite_init(
    Y,
    width: float = 2.0,
    *,
    K: int | None = None,
    nb: int = 1,
    tsub: int | None = None,
    smooth: int = 3,
    z: float = 3.0,
    peak_snr: float | None = None,
    min_pixels: int | None = None,
    dup_corr: float = 0.7,
    n_seeds: int | None = None,
    max_rounds: int = 24,
    n_iter: int = 8,
    n_iter_joint: int = 20,
    n_iter_background: int = 5,
    chunk_frames: int = 500,
    peel: bool = True,
    z_peel: float = 5.0,
    peel_fraction: float = 0.1,
) -> InitResult:
    """Event-triggered sparse start for dendrites and axons: the fit's `init="dendrite"` (CaImAn: `sparse_nmf`).

    Steps (module docstring for the idea): (1) Y minus each pixel's median, minus its spatial Gaussian blur of sigma
    `4 * width` (removes background and neuropil), averaged over `tsub` frames, divided by each pixel's noise (PSD
    estimate): Z, unit noise. (2) Rounds: the peak SNR of every pixel (moving sum of `smooth` frames / sqrt(smooth),
    max over time); up to `n_seeds` local maxima above `peak_snr`, at least `2 width + 1` pixels apart; each seed's
    first footprint is the significant support (`significant_support`, level `z`) of its strongest event's frame;
    `n_iter` rank-1 steps on the whole field (c = a'Z / |a|^2, a = significant part of Z c / |c|^2). A candidate is
    kept if its footprint has at least `min_pixels` pixels and its trace does not correlate above `dup_corr` with an
    overlapping component already kept (else its seed is marked exhausted); kept ones are subtracted from Z. Stops
    when a round keeps nothing, after `max_rounds`, or at `K`. (3) `n_iter_joint` joint HALS sweeps of all
    footprints (each within a one-pixel band around its support) and traces on Z; then `peel_shared_activity` moves
    activity that two touching components share onto the one that carries it alone (a branch start that also holds
    its process's back-propagating events, a process found in pieces), and the joint sweeps are repeated; back in
    movie units. (4) Full-rate
    traces: non-negative least squares of the high-passed movie onto the footprints; background: rank-`nb` HALS of
    Y - A C.

    **Arguments:**

    - `Y`: movie (T, H, W), finite.
    - `width`: typical process width in pixels (the fit's `neuron_radius`; sets the background blur and seed spacing).
    - `K`: optional upper bound on the number of components (default: stop by the noise only).
    - `nb`: background rank.
    - `tsub`: frames averaged for the search (default `max(1, T // 1000)`: the search sees about 1000 frames).
    - `smooth`: frames (after binning) summed when scoring events.
    - `z`: per-pixel significance level of footprint pixels (in noise standard deviations).
    - `peak_snr`: smallest smoothed peak SNR that seeds a component (default `default_peak_threshold` of the number of
      pixel-frames searched, i.e. about one false seed per movie from noise alone).
    - `min_pixels`: smallest footprint kept (default `max(6, 4 * width)`: a short stretch of process).
    - `dup_corr`: trace correlation above which an overlapping candidate is a duplicate.
    - `n_seeds`: seeds refined per round (default 16 per 128x128 pixels, at least 16: a round's cost is mostly its
      passes over the movie, so a larger field takes more seeds per round rather than more rounds).
    - `max_rounds`: safeguard on the number of rounds (the search normally stops by itself when a round keeps
      nothing; 12 rounds of 16 seeds cut the search short on a 256x256 field with 30 processes and their branches).
    - `n_iter`, `n_iter_joint`, `n_iter_background`: sizes of the search (fixed shapes, so each round compiles
      once).
    - `chunk_frames`: frames per chunk when projecting the full-rate movie.
    - `peel`, `z_peel`, `peel_fraction`: run `peel_shared_activity` (its `z` and `min_fraction`) after step (3).

    **Returns:** an `InitResult` (A columns of unit l2 norm; `centers` the footprints' centres of mass; `psnr` each
    component's seed peak SNR).
    """
    Y = _as_movie(Y)
    T, H, W = Y.shape
    d = H * W
    if not (isinstance(width, (int, float, np.integer, np.floating)) and width > 0):
        raise ParameterError(f"width={width!r}: give the typical process width in pixels (> 0).")
    if K is not None and (int(K) != K or K < 1):
        raise ParameterError(f"K={K!r}: give None or a positive integer upper bound on the number of components.")
    if int(nb) != nb or nb < 1:
        raise ParameterError(f"nb={nb!r}: the background rank must be an integer >= 1.")
    tsub = max(1, T // 1000) if tsub is None else int(tsub)
    if tsub < 1 or T // tsub < max(4 * smooth, 20):
        raise ParameterError(f"tsub={tsub!r}: leaves {T // max(tsub, 1)} frames to search; use a smaller tsub.")
    dtype = Y.dtype
    min_pixels = int(max(6, round(4 * width))) if min_pixels is None else int(min_pixels)
    sep = max(1, int(round(width)))
    kernel = jnp.asarray(gaussian_kernel1d(4.0 * width), dtype)
    blur = jnp.asarray(gaussian_kernel1d(0.5 * width, truncate=2.0), dtype)

    # (1) whitened, high-passed, binned movie Z (d, Tb)
    median = jnp.median(Y, axis=0)
    Xb = highpass_movie(_bin_frames(Y, tsub), median, kernel)
    Tb = Xb.shape[0]
    Xb = Xb.reshape(Tb, d).T
    sn = estimate_noise(Xb)
    sn = jnp.where(sn > 0, sn, jnp.maximum(jnp.median(sn), 1e-12))
    Z = Xb / sn[:, None]
    del Xb
    thr = default_peak_threshold(d * Tb / smooth) if peak_snr is None else float(peak_snr)
    n_seeds = max(16, 16 * -(-d // 16384)) if n_seeds is None else int(n_seeds)

    # (2) rounds of event-triggered candidates
    exhausted = jnp.zeros(d, bool)
    known = jnp.zeros(d, bool)
    half = max(1, int(round(1.5 * width)))
    kept_a, kept_c, kept_peak = [], [], []
    R = Z + 0.0
    k_max = K if K is not None else d
    for _ in range(max_rounds):
        a, c, peak, seeds = _candidates(R, exhausted, known, thr, z, blur, shape=(H, W), n_seeds=n_seeds,
                                        n_iter=n_iter, smooth=smooth, sep=sep, half=half)
        a, c, peak, seeds = (np.asarray(x) for x in (a, c, peak, seeds))
        new = []
        bad = []
        for j in np.argsort(-peak, kind="stable"):
            if peak[j] <= 0 or len(kept_a) + len(new) >= k_max:
                continue
            sup = a[:, j] > 0
            if sup.sum() < min_pixels or not np.any(c[j] > 0):
                bad.append(seeds[j])
                continue
            if _duplicate(a[:, j], c[j], kept_a + [a[:, i] for i in new], kept_c + [c[i] for i in new], dup_corr):
                bad.append(seeds[j])
                continue
            new.append(j)
        if bad:
            exhausted = exhausted.at[jnp.asarray(np.asarray(bad, np.int32))].set(True)
        if not new:
            if not bad:
                break
            continue
        idx = np.asarray(new)
        R = _subtract(R, jnp.asarray(a[:, idx]), jnp.asarray(c[idx]))
        for j in new:
            kept_a.append(a[:, j])
            kept_c.append(c[j])
            kept_peak.append(peak[j])
        exhausted = exhausted.at[jnp.asarray(seeds[idx])].set(True)
        known = known | jnp.asarray(np.any(a[:, idx] > 0, axis=1))
        if len(kept_a) >= k_max:
            break
    del R

    median_flat = median.reshape(d)
    if not kept_a:
        A = jnp.zeros((d, 0), dtype)
        C = jnp.zeros((0, T), dtype)
        M = Y.reshape(T, d).T
        b, f = background_hals(M, jnp.maximum(median_flat, 0.0)[:, None] * jnp.ones((1, nb), dtype) / nb,
                               jnp.ones((nb, T), dtype), n_iter=int(n_iter_background))
        return InitResult(A=A, C=C, b=b, f=f, centers=jnp.zeros((0, 2), jnp.float32), median=median,
                          psnr=jnp.zeros((0,), jnp.float32))

    # (3) joint refinement on Z, each footprint within a band around its support
    Az = jnp.asarray(np.stack(kept_a, 1), dtype)
    Cz = jnp.asarray(np.stack(kept_c, 0), dtype)
    support = jnp.asarray(_dilate_cross(np.stack(kept_a, 1) > 0, (H, W), 1))
    Az, Cz = _hals_supported(Z, Az, Cz, support, int(n_iter_joint))
    if peel:
        Az_np, Cz_np, kept_idx = peel_shared_activity(np.asarray(Az), np.asarray(Cz), (H, W), smooth=smooth, thr=thr,
                                                      z=z_peel, min_fraction=peel_fraction, reach=sep)
        if kept_idx.size < Az.shape[1] or not np.array_equal(Az_np > 0, np.asarray(Az) > 0):
            kept_peak = [kept_peak[i] for i in kept_idx]
            support = jnp.asarray(_dilate_cross(Az_np > 0, (H, W), 1))
            Az, Cz = _hals_supported(Z, jnp.asarray(Az_np, dtype), jnp.asarray(Cz_np, dtype), support,
                                     int(n_iter_joint))
    del Z
    A = Az * sn[:, None]  # back to movie units (of the high-passed movie)
    na = jnp.sqrt(jnp.sum(A * A, axis=0))
    keep = np.flatnonzero(np.asarray(na) > 0)
    A = A[:, keep] / na[keep][None, :]
    psnr = np.asarray(kept_peak, np.float32)[keep]

    # (4) full-rate traces and background
    AtR = _project_frames(Y, median, kernel, A, chunk_frames)
    AtA = A.T @ A
    C0 = jnp.maximum(AtR, 0.0)
    C = _hals_traces(AtR, AtA, C0 / jnp.maximum(jnp.diag(AtA), 1e-12)[:, None], 10)
    M = Y.reshape(T, d).T - A @ C
    b0 = jnp.maximum(median_flat, 0.0)[:, None] * jnp.linspace(1.0, 0.5, nb, dtype=dtype)[None, :]
    f0 = jnp.ones((nb, T), dtype) + 0.1 * (jnp.arange(nb) > 0)[:, None] * jnp.cos(jnp.linspace(0, 3.0, T, dtype=dtype))
    b, f = background_hals(M, b0, f0, n_iter=int(n_iter_background))
    order = np.argsort(-psnr, kind="stable")
    A, C, psnr = A[:, order], C[order], psnr[order]
    return InitResult(A=A, C=C, b=b, f=f, centers=jnp.asarray(_centres(np.asarray(A), H, W)), median=median,
                      psnr=jnp.asarray(psnr))


def _project_frames(Y, median, kernel, A, chunk_frames: int) -> jax.Array:
    """A' (high-passed Y) over all frames, (K, T), in equal chunks (the last one overlapping) to bound memory."""
    T = Y.shape[0]
    L = min(int(chunk_frames), T)
    out = []
    done = 0
    while done < T:
        start = min(done, T - L)
        part = _project_chunk(Y[start : start + L], median, kernel, A)
        out.append(part[:, done - start :])
        done = start + L
    return jnp.concatenate(out, axis=1)


def _duplicate(a, c, kept_a, kept_c, thr) -> bool:
    """True when (a, c) overlaps a kept footprint whose trace correlates with c above `thr`."""
    if not kept_a:
        return False
    sup = a > 0
    for ka, kc in zip(kept_a, kept_c):
        if not np.any(sup & (ka > 0)):
            continue
        x, y = c - c.mean(), kc - kc.mean()
        den = math.sqrt(float(x @ x) * float(y @ y))
        if den > 0 and float(x @ y) / den > thr:
            return True
    return False


def _centres(A: np.ndarray, H: int, W: int) -> np.ndarray:
    """(K, 2) float32 centre of mass (row, col) of each column of A (d, K)."""
    rows, cols = np.divmod(np.arange(H * W), W)
    tot = np.maximum(A.sum(0), 1e-30)
    return (np.stack([rows @ A, cols @ A], 1) / tot[:, None]).astype(np.float32).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------- shared activity


def _trimmed_scale(ci: np.ndarray, cj: np.ndarray, sd_j: float, n_iter: int = 8) -> tuple[float, float, int]:
    """Scale `alpha >= 0` of `ci` inside `cj` under the model cj = alpha ci + r + noise, r >= 0 sparse (cj's own events).

    Least squares through the origin on the frames where cj does not show an event of its own (residual below 2.5
    noise sd), re-selected from the current fit a few times (a trimmed regression: frames of cj's own events would
    bias alpha up; frames where ci is active and cj is not pull it down, as they should).

    **Returns:** `(alpha, z, n)`: the scale, its size in standard errors (`alpha ||ci|| / sd_j` over the frames used),
    and the number of frames used.
    """
    keep = np.ones(ci.size, bool)
    alpha = 0.0
    for _ in range(n_iter):
        den = float(ci[keep] @ ci[keep])
        if den <= 0:
            return 0.0, 0.0, 0
        alpha = max(0.0, float(ci[keep] @ cj[keep]) / den)
        new = (cj - alpha * ci) < 2.5 * sd_j
        if np.array_equal(new, keep):
            break
        keep = new
    den = float(ci[keep] @ ci[keep])
    return alpha, alpha * math.sqrt(max(den, 0.0)) / max(sd_j, 1e-30), int(keep.sum())


def peel_shared_activity(A: np.ndarray, C: np.ndarray, shape, *, smooth: int, thr: float, z: float = 5.0,
                         min_fraction: float = 0.25, reach: int = 2):
    """Move activity shared by two touching components onto the one that carries it alone.

    The model is degenerate for a branch with local events: on the branch's pixels the process's back-propagating
    events and the branch's own ones add up, so (trunk, c_process) + (branch, c_process + c_branch) fits the data
    exactly as well as the simulated truth (trunk + branch, c_process) + (branch, c_branch). A start seeded on a
    branch event lands on the first form, and the fit's merging then joins the branch to its process (their traces
    correlate), losing the branch-local component. The same holds for a process split into pieces (a piece whose
    trace is the process's own). Among the equally good fits, the sparse-activity prior of the model picks the one
    whose traces have the fewest events: if c_j contains alpha c_i (i, j with touching supports; alpha by
    `_trimmed_scale`, significant at `z` standard errors and at least `min_fraction` of c_j's energy), then
    a_i += alpha a_j and c_j -= alpha c_i (A C unchanged up to the clip at 0). A component left without any event
    above `thr` (peak of its `smooth`-frame moving sum, in noise units) was a piece of its neighbour and is dropped.
    Pairs are applied greedily, largest explained energy first, until none qualifies.

    **Arguments:** `A` (d, K) whitened footprints, `C` (K, T) traces (unit pixel noise: a trace's noise sd is
    1 / ||a||), `shape` (H, W), `smooth`, `thr` as in `dendrite_init`; `z`, `min_fraction` the tests above; `reach`
    pixels of 4-connected dilation within which two supports touch.

    **Returns:** `(A, C, kept)`: the new footprints and traces of the kept components and their indices in the input.
    """
    A = np.array(A, np.float64)
    C = np.array(C, np.float64)
    K = A.shape[1]
    if K < 2:
        return A, C, np.arange(K)
    near = _dilate_cross(A > 0, shape, int(reach)).astype(np.float32)
    touch = (near.T @ (A > 0).astype(np.float32)) > 0
    touch = touch | touch.T
    np.fill_diagonal(touch, False)
    alive = np.ones(K, bool)
    done = np.zeros((K, K), bool)  # ordered pairs already moved (each at most once: no cycles)
    gain = np.zeros((K, K))  # gain[i, j]: energy of c_j explained by c_i where the move qualifies, else 0
    scale = np.zeros((K, K))

    def score(i, j):
        gain[i, j] = 0.0
        na = float(np.linalg.norm(A[:, j]))
        if not (alive[i] and alive[j] and touch[i, j]) or done[i, j] or na <= 0:
            return
        alpha, zz, _ = _trimmed_scale(C[i], C[j], 1.0 / na)
        e = alpha * alpha * float(C[i] @ C[i])
        if zz > z and e >= min_fraction * float(C[j] @ C[j]):
            gain[i, j], scale[i, j] = e, alpha

    for i, j in zip(*np.nonzero(touch)):
        score(i, j)
    w = max(1, min(int(smooth), C.shape[1]))
    for _ in range(4 * K):
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[i, j] <= 0:
            break
        alpha = scale[i, j]
        done[i, j] = True
        A[:, i] += alpha * A[:, j]
        C[j] = np.maximum(C[j] - alpha * C[i], 0.0)
        cs = np.concatenate([[0.0], np.cumsum(C[j])])
        if float(np.max(cs[w:] - cs[:-w])) / math.sqrt(w) * float(np.linalg.norm(A[:, j])) <= thr:
            alive[j] = False
        touch[i] |= touch[j]
        touch[:, i] |= touch[:, j]
        touch[i, i] = False
        for k in np.flatnonzero(touch[i] | touch[j]):
            for a, b in ((i, k), (k, i), (j, k), (k, j)):
                if a != b:
                    score(a, b)
        gain[i, j] = gain[j, i] = 0.0
        if not alive[j]:
            gain[j, :] = 0.0
            gain[:, j] = 0.0
    kept = np.flatnonzero(alive)
    return A[:, kept], C[kept], kept
