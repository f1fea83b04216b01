"""Starting points for the CNMF fit: greedy Gaussian-blob initialisation (somata) and sparse NMF (dendrites, axons).

First stage of the pipeline: a movie (T,H,W) in, footprints A (d,K), traces C (K,T) and a background b f out, which
the spatial / temporal updates of `fit` then refine.
"""

from __future__ import annotations

import math
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._threads import Pool
from .errors import MovieError, ParameterError

__all__ = ["InitResult", "greedy_init", "sparse_nmf_init", "gaussian_blur", "score_filter", "background_hals"]


class InitResult(eqx.Module):
    """What an initialisation hands to the fit.

    **Fields:**

    - `A`: (d, K) non-negative footprints, d = H*W pixels in row-major order, each column of unit l2 norm.
    - `C`: (K, T) non-negative traces in the matching units (so `A @ C` is in movie units, above the background).
    - `b`: (d, nb) non-negative spatial background; `f`: (nb, T) non-negative background traces, each row of mean 1
      (so `b[:, 0]` is close to the median image for nb = 1).
    - `centers`: (K, 2) float (row, col) of each component's seed pixel (greedy) or centre of mass (sparse NMF).
    - `median`: (H, W) per-pixel temporal median of the movie (the first background guess).
    - `psnr`: (K,) peak of each seed's filtered residual trace over that trace's noise (greedy; energy rank otherwise).
    """

    A: jax.Array
    C: jax.Array
    b: jax.Array
    f: jax.Array
    centers: jax.Array
    median: jax.Array
    psnr: jax.Array


# ------------------------------------------------------------------------------------------------------------ checks


def _as_movie(Y, name: str = "Y", *, host: bool = False) -> jax.Array | np.ndarray:
    """Validate a (T,H,W) movie and return it as a floating array (float32 unless already floating).

    With `host=True` a numpy movie stays a numpy array (of the dtype JAX would give it), so a caller that reads it
    in blocks never holds a second, device copy of the whole movie; other inputs become jnp arrays.
    """
    if not hasattr(Y, "shape") or len(Y.shape) != 3:
        raise MovieError(
            f"{name}: expected a movie array of shape (T, H, W), got shape {getattr(Y, 'shape', type(Y))}; "
            "load files with jaxcnmf.load_movie first."
        )
    if host and isinstance(Y, np.ndarray):
        dtype = jax.dtypes.canonicalize_dtype(Y.dtype if np.issubdtype(Y.dtype, np.floating) else np.float32)
        Y = Y if Y.dtype == dtype else Y.astype(dtype)
        finite = all(np.isfinite(Y[t : t + 64]).all() for t in range(0, Y.shape[0], 64))
    else:
        Y = jnp.asarray(Y)
        if not jnp.issubdtype(Y.dtype, jnp.floating):
            Y = Y.astype(jnp.float32)
        finite = bool(jnp.isfinite(Y).all())
    T, H, W = Y.shape
    if T < 3 or H < 3 or W < 3:
        raise MovieError(f"{name}: movie of shape {Y.shape} is too small (need at least 3 frames and 3x3 pixels).")
    if not finite:
        raise MovieError(
            f"{name}: the movie holds NaN or infinite values; repair them first "
            "(jaxcnmf.open_movie(..., nonfinite='repair'))."
        )
    return Y


def _check_radius(radius, H: int, W: int) -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise ParameterError(f"radius: expected a number of pixels, got {radius!r}.") from None
    if not math.isfinite(r) or r <= 0:
        raise ParameterError(f"radius={radius!r}: the neuron radius must be a positive number of pixels.")
    if 2 * r + 1 > min(H, W):
        raise ParameterError(
            f"radius={radius!r}: a neuron of that radius does not fit in the {H}x{W} field of view; "
            "give the radius in pixels (typically 2-10)."
        )
    return r


# ------------------------------------------------------------------------------------------------------------- filters


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Normalised 1-D Gaussian taps of standard deviation `sigma`, half-width ceil(truncate * sigma).

    **Arguments:** `sigma` (pixels, > 0); `truncate` (half-width in units of sigma).

    **Returns:** float numpy array of odd length summing to 1.
    """
    half = max(1, int(math.ceil(truncate * sigma)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _taps_along(x: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    """Correlate `x` with the odd-length 1-D `kernel` along `axis` (zero padding): a sum of shifted slices, which XLA
    fuses into one pass (much faster on CPU than a one-channel convolution)."""
    n = kernel.shape[0]
    half = n // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, half)
    xp = jnp.pad(x, pad)
    L = x.shape[axis]
    out = kernel[0] * lax.slice_in_dim(xp, 0, L, axis=axis)
    for i in range(1, n):
        out = out + kernel[i] * lax.slice_in_dim(xp, i, i + L, axis=axis)
    return out


@jax.jit
def gaussian_blur(frames: jax.Array, kernel: jax.Array) -> jax.Array:
    """Separable filter of every frame of a (..., H, W) stack with the 1-D `kernel` on both axes (zero padding).

    **Arguments:** `frames` (..., H, W) floating; `kernel` (k,) 1-D taps, k odd (e.g. `gaussian_kernel1d`).

    **Returns:** filtered stack, same shape and dtype.
    """
    k = jnp.asarray(kernel).astype(frames.dtype)
    return _taps_along(_taps_along(frames, k, -1), k, -2)


def _evenly_spaced(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
    """At most n evenly spaced slices of x along `axis` (all of x when it is short enough)."""
    L = x.shape[axis]
    if L <= n:
        return x
    step = -(-L // n)
    return lax.slice_in_dim(x, 0, L, stride=step, axis=axis)


# --------------------------------------------------------------------------------------------------- rank-1 refinement


def rank1_nmf(X: jax.Array, a0: jax.Array, n_iter: int, nonneg_c: bool = True) -> tuple[jax.Array, jax.Array]:
    """Rank-1 factorisation X (T, n) ~ c a' with a >= 0 by alternating (projected) least squares.

    **Arguments:** `X` (T, n) data; `a0` (n,) non-negative start for the spatial factor; `n_iter` alternations (fixed);
    `nonneg_c`: also constrain c >= 0 (a non-negative factorisation); False lets c take either sign (a trace measured
    against a baseline that may sit below zero).

    **Returns:** `(a, c)`: a (n,) >= 0 of unit l2 norm (zero if the fit is empty), c (T,) (>= 0 with `nonneg_c`).
    """
    tiny = jnp.asarray(1e-12, X.dtype)
    proj = (lambda v: jnp.maximum(v, 0.0)) if nonneg_c else (lambda v: v)

    def step(_, a):
        c = proj(X @ a) / jnp.maximum(a @ a, tiny)
        a = jnp.maximum(X.T @ c, 0.0) / jnp.maximum(c @ c, tiny)
        return a

    a = lax.fori_loop(0, n_iter, step, a0)
    na = jnp.sqrt(a @ a)
    a = jnp.where(na > 0, a / jnp.maximum(na, tiny), 0.0)
    c = proj(X @ a)
    return a, c


def window_rank1(
    X: jax.Array, ring: jax.Array, inside: jax.Array, a0: jax.Array, n_iter: int, support: jax.Array | None = None,
    baseline: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Rank-1 fit of one window after removing its local background: X - h 1' ~ c a' on the pixels inside the image.

    h_t is the median of frame t over the window's border `ring` (pixels assumed outside the neuron; only those
    inside the image count), so a smooth neuropil / background under the neuron goes into h rather than into c.
    c may take either sign: the movie had each pixel's median removed, which for an active neuron lies above its
    resting level, so its quiet frames sit below zero.

    a is fitted on the pixels of `support` only (the greedy init uses a disc of 1.5 neuron radii around the seed):
    a dim neuron with few transients holds less energy than the leading non-negative direction of the noise of a
    whole window, so an unrestricted fit drifts to noise spread over the window (seen on real data, where most cells
    fire a handful of times); the disc keeps the fit on the neuron while the wider window still gives the ring.

    **Arguments:** `X` (T, n) window data; `ring` (m,) int indices of the border pixels (unused when `baseline` is
    given: X may then be a crop that holds the support only); `inside` (n,) bool pixels inside the image; `a0` (n,)
    start; `n_iter` alternations; `support` (n,) bool pixels a may use (None: all); `baseline` (T,) h computed
    beforehand, NaN where no border pixel is inside the image (h = 0 then; the greedy init takes the ring medians on
    the host, `_ring_medians`); None: `ring_median` here.

    **Returns:** `(a, c)` as `rank1_nmf`, a zero outside the image and the support.
    """
    if baseline is None:
        use = inside[ring]
        h = jnp.where(jnp.any(use), ring_median(X[:, ring], use), 0.0)
    else:
        h = jnp.where(jnp.isnan(baseline), 0.0, baseline)
    Xc = jnp.where(inside[None, :], X - h[:, None], 0.0)
    if support is None:
        return rank1_nmf(Xc, jnp.where(inside, a0, 0.0), n_iter, nonneg_c=False)
    fit_px = inside & support
    return rank1_nmf(jnp.where(fit_px[None, :], Xc, 0.0), jnp.where(fit_px, a0, 0.0), n_iter, nonneg_c=False)


def _ring_median_host(x: np.ndarray, use: np.ndarray) -> np.ndarray:
    """`ring_median` in numpy: sort (NaN last), then jnp.nanmedian's own interpolation in float32, bit for bit."""
    x = np.asarray(x)
    use = np.broadcast_to(np.asarray(use, bool)[..., None, :], x.shape)
    xs = np.sort(np.where(use, x, np.nan), axis=-1)
    n = use[..., :1, :].sum(axis=-1, keepdims=True).astype(x.dtype)  # (..., 1, 1) valid entries per row
    q = np.asarray(0.5, x.dtype) * (n - np.asarray(1, x.dtype))
    low, high = np.floor(q), np.ceil(q)
    hw = q - low
    lw = np.asarray(1, x.dtype) - hw
    m = x.shape[-1]
    lo = np.broadcast_to(np.clip(low, 0, m - 1).astype(np.intp), x.shape[:-1] + (1,))
    hi = np.broadcast_to(np.clip(high, 0, m - 1).astype(np.intp), x.shape[:-1] + (1,))
    lv = np.take_along_axis(xs, lo, axis=-1)
    hv = np.take_along_axis(xs, hi, axis=-1)
    return (lv * lw + hv * hw)[..., 0].astype(x.dtype)


def ring_median(x: jax.Array, use: jax.Array) -> jax.Array:
    """Median over the last axis of `x` (..., T, m) of the entries where `use` (..., m) is True, as
    `jnp.nanmedian(jnp.where(use, x, nan), axis=-1)` (NaN where no entry is used).

    Pure XLA (jit/vmap safe, on every backend). The greedy initialisation does not call it inside its jitted round on
    the CPU: XLA's CPU sort of many short rows is ~20x slower than numpy's (0.6 s vs 0.03 s for the 16 windows x 3000
    frames x 80 border pixels of one round on 256x256x3000), so it reads the border pixels out, takes the medians on
    the host (`_ring_median_host`, the same values bit for bit) and passes them in. (A `jax.pure_callback` inside the
    round did the same until it hung the initialisation twice on a one-core run: CPU async dispatch with host
    callbacks can deadlock, jax-ml/jax#25861.)

    **Arguments:** `x` (..., T, m) floating; `use` (..., m) bool.

    **Returns:** (..., T) medians, dtype of `x`.
    """
    return jnp.nanmedian(jnp.where(use[..., None, :], x, jnp.nan), axis=-1)


@partial(jax.jit, static_argnames=("h", "pad"))
def _ring_pixels(Rp, centres, inside, *, h, pad):
    """The border-ring pixels of every window of a greedy round: (n, T, m) values of Rp and (n, m) inside flags, m =
    4 (w - 1): the window's top row, bottom row, left and right columns (the ring's order does not change a median).

    Cut as four strips of Rp: gathering the ring from each (T, w, w) window took 21 ms a round on 256x256x1000
    (16 windows of 21x21), the strips 4 ms."""
    T = Rp.shape[0]
    w, off = 2 * h + 1, pad - h

    def one(rc):
        r0, c0 = rc[0] + off, rc[1] + off
        top = lax.dynamic_slice(Rp, (0, r0, c0), (T, 1, w)).reshape(T, w)
        bottom = lax.dynamic_slice(Rp, (0, r0 + w - 1, c0), (T, 1, w)).reshape(T, w)
        left = lax.dynamic_slice(Rp, (0, r0 + 1, c0), (T, w - 2, 1)).reshape(T, w - 2)
        right = lax.dynamic_slice(Rp, (0, r0 + 1, c0 + w - 1), (T, w - 2, 1)).reshape(T, w - 2)
        ins = lax.dynamic_slice(inside, (r0, c0), (w, w))
        use = jnp.concatenate([ins[0], ins[-1], ins[1:-1, 0], ins[1:-1, -1]])
        return jnp.concatenate([top, bottom, left, right], axis=1), use

    return jax.vmap(one)(centres)


def _ring_medians(Rp, centres, inside, *, h, pad) -> jax.Array:
    """`ring_median` of every window of a greedy round, (n, T), where it is fastest: on the host for the CPU backend
    (between jitted computations, never inside one), else in XLA."""
    x, use = _ring_pixels(Rp, centres, inside, h=h, pad=pad)
    if jax.default_backend() != "cpu":
        return ring_median(x, use)
    return jnp.asarray(_ring_median_host(np.asarray(jax.block_until_ready(x)), np.asarray(use)))


def score_kernels(sigma: float, half: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D taps of the seed-score filter: a Gaussian g (sd sigma, half-width `half`) and a flat box of g's mean.

    Filtering with g (x) g minus box (x) box is the 2-D Gaussian minus its own mean over the (2 half + 1)^2 square:
    a zero-sum, centre-surround filter that keeps neuron-sized blobs and removes smooth background and neuropil.
    """
    g = gaussian_kernel1d(sigma, truncate=half / sigma)
    return g, np.full_like(g, g.mean())


@jax.jit
def score_filter(frames: jax.Array, g: jax.Array, box: jax.Array) -> jax.Array:
    """The seed-score filter (see `score_kernels`) applied to every frame of a (..., H, W) stack."""
    return gaussian_blur(frames, g) - gaussian_blur(frames, box)


@partial(jax.jit, static_argnames=("h", "hb", "hs", "pad", "n_iter", "n_smooth", "n_slow"), donate_argnums=(0, 1))
def _greedy_round(
    Rp, Bp, centres, valid, a0, support, inside, g, box, snp, snr_stop, ring_med, *, h, hb, hs, pad, n_iter,
    n_smooth, n_slow
):
    """One batched greedy round on the padded working movies (all windows the same size: one compiled shape).

    Rp, Bp: (T, H+2pad, W+2pad) residual and filtered residual (donated); `_rescore` then updates the energy and peak
    maps of the touched pixels;
    centres (n, 2) int pixel coordinates in the unpadded image, valid (n,) bool (the chosen centres first, then
    padding); a0 (w*w,) start footprint;
    support (w*w,) bool pixels the footprint may use, all within hs of the centre; inside (H+2pad, W+2pad) bool
    image pixels; g, box the score filter's taps;
    snp (H+2pad, W+2pad) noise of B; snr_stop the eligibility level; ring_med (n, T) each window's border median
    (`_ring_medians`).
    A fit that lowers its seed's peak-to-noise by less than snr_stop / 2 is dropped (it fitted something else).
    The subtractions touch only the (2 hs + 1)^2 square of Rp that holds the support and the (2 hf + 1)^2 square of
    Bp that its filtered footprint reaches (hf = hs + hb - h; a, filter(a) are zero outside): with the default
    fit_radius of 1.5 radii this cut the round's subtractions on 256x256x1000 from 74 to 50 ms (16 windows).
    The rank-1 fits take only the (2 hs + 1)^2 square of Rp that holds the support (the border medians come in
    `ring_med`): 1.10 -> 0.78 s over the 11 rounds of 256x256x1000 (13x13 instead of 21x21 pixels a window); the
    fits' sums over the zero pixels outside the support went with it, so A and C moved by float32 rounding (<= 4e-7
    of their max; the same 159 components and seeds, F1 and trace correlations against the truth unchanged).
    Returns updated (Rp, Bp), the fitted (a (n, w, w), c (n, T)) with a c' subtracted (zero where dropped),
    each trace's baseline q (n,) (its 20th percentile), and the kept flags (n,).
    """
    T = Rp.shape[0]
    w, ws, hf = 2 * h + 1, 2 * hs + 1, hs + hb - h
    wf = 2 * hf + 1
    off_r, off_b = pad - h, pad - hb
    n_used = jnp.sum(valid.astype(jnp.int32))  # the chosen centres come first; the padding needs no subtract/rescore

    def window(rc):
        return lax.dynamic_slice(Rp, (0, rc[0] + pad - hs, rc[1] + pad - hs), (T, ws, ws)).reshape(T, ws * ws)

    def window_inside(rc):
        return lax.dynamic_slice(inside, (rc[0] + pad - hs, rc[1] + pad - hs), (ws, ws)).reshape(ws * ws)

    def crop(v):
        return v.reshape(w, w)[h - hs : h + hs + 1, h - hs : h + hs + 1].reshape(ws * ws)

    X = jax.vmap(window)(centres)
    ins = jax.vmap(window_inside)(centres)
    a, c = jax.vmap(window_rank1, in_axes=(0, None, 0, None, None, None, 0))(X, None, ins, crop(a0), n_iter,
                                                                             crop(support), ring_med)
    a = jnp.pad(a.reshape(-1, ws, ws), ((0, 0), (h - hs, h - hs), (h - hs, h - hs))).reshape(-1, w * w)
    # filtered footprint, in the larger window that the filter can reach
    a_big = jnp.pad(a.reshape(-1, w, w), ((0, 0), (hb - h, hb - h), (hb - h, hb - h)))
    ab = score_filter(a_big, g, box)
    # progress check: the fit must lower the seed's peak-to-noise by at least snr_stop / 2 (half of what made it a
    # seed at the least), else the window's main structure is something else
    seed_trace = jax.vmap(lambda rc: lax.dynamic_slice(Bp, (0, rc[0] + pad, rc[1] + pad), (T, 1, 1)))(centres)
    before = jax.vmap(lambda x: _peak_above_slow(x, n_smooth, n_slow))(seed_trace[:, :, 0, 0])
    peak = jax.vmap(lambda x: _peak_above_slow(x, n_smooth, n_slow))
    after = peak(seed_trace[:, :, 0, 0] - ab[:, hb, hb][:, None] * c)
    scale = jnp.sqrt(float(n_smooth)) / jax.vmap(lambda rc: snp[rc[0] + pad, rc[1] + pad])(centres)
    valid = valid & ((before - after) * scale >= 0.5 * snr_stop)
    a = jnp.where(valid[:, None], a, 0.0).reshape(-1, w, w)
    c = jnp.where(valid[:, None], c, 0.0)
    ab = jnp.where(valid[:, None, None], ab, 0.0)
    a_s = a[:, h - hs : h + hs + 1, h - hs : h + hs + 1]
    ab_f = ab[:, hb - hf : hb + hf + 1, hb - hf : hb + hf + 1]

    def subtract(k, state):
        Rp, Bp = state
        r0, r1 = centres[k, 0] + pad - hs, centres[k, 1] + pad - hs
        cur = lax.dynamic_slice(Rp, (0, r0, r1), (T, ws, ws))
        Rp = lax.dynamic_update_slice(Rp, cur - c[k][:, None, None] * a_s[k][None], (0, r0, r1))
        r0, r1 = centres[k, 0] + pad - hf, centres[k, 1] + pad - hf
        cur = lax.dynamic_slice(Bp, (0, r0, r1), (T, wf, wf))
        Bp = lax.dynamic_update_slice(Bp, cur - c[k][:, None, None] * ab_f[k][None], (0, r0, r1))
        return Rp, Bp

    Rp, Bp = lax.fori_loop(0, n_used, subtract, (Rp, Bp))
    q = jnp.quantile(c, 0.2, axis=1)
    return Rp, Bp, a, c, q, valid


@partial(jax.jit, static_argnames=("hf", "pad"))
def _window_of(Bp, rc, *, hf, pad):
    """The (T, wf, wf) window of Bp (wf = 2 hf + 1) whose pixels a greedy round at centre rc (unpadded) touched."""
    wf = 2 * hf + 1
    return lax.dynamic_slice(Bp, (0, rc[0] + pad - hf, rc[1] + pad - hf), (Bp.shape[0], wf, wf))


@partial(jax.jit, static_argnames=("hf", "pad", "n_smooth", "n_slow"), donate_argnums=(1, 2))
def _rescore_window(X, Ep, Pp, rc, *, hf, pad, n_smooth, n_slow):
    """Energy and transient peak (`_peak_above_slow`) of the window X (`_window_of`), written into Ep and Pp."""
    r0, r1 = rc[0] + pad - hf, rc[1] + pad - hf
    Ep = lax.dynamic_update_slice(Ep, jnp.sum(X * X, axis=0), (r0, r1))
    Pp = lax.dynamic_update_slice(Pp, _peak_above_slow(X, n_smooth, n_slow), (r0, r1))
    return Ep, Pp


def _rescore(Bp, Ep, Pp, centres, *, hf, pad, n_smooth, n_slow):
    """Re-score the pixels of a greedy round's windows after its subtractions, window by window.

    Only the (2 hf + 1)^2 square around each kept centre that the subtracted filtered footprint reached changes
    (33x33 of the 41x41 window at the default fit_radius; 0.80 -> 0.54 s over the 11 rounds of 256x256x1000).
    The window is cut out in one compiled call and scored in another: on XLA's CPU backend the scans of
    `_peak_above_slow` run 2.5-5x slower when the slice of the big movie is fused into the same computation
    (13 vs 5 ms a window at 1000 frames), and scoring all windows of a round as one (T, n wb^2) array is slower
    still (it leaves the cache: 0.29 s for 16 windows); one call per window that slices behind an optimization
    barrier, or one loop over the round's windows, took 103 ms for 16 33x33 windows against 53 ms for the two calls
    (one core). Every window reads Bp after all subtractions, so windows
    that overlap write the same values there.
    """
    kw = dict(hf=hf, pad=pad, n_smooth=n_smooth, n_slow=n_slow)
    for rc in centres:
        rc = jnp.asarray(rc, jnp.int32)
        Ep, Pp = _rescore_window(_window_of(Bp, rc, hf=hf, pad=pad), Ep, Pp, rc, **kw)
    return Ep, Pp


_MALLOC_TRIM = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim`; a no-op elsewhere). Internal (not in
    `__all__`): `_prepare` calls it after its blocked passes and `fit` after every stage.

    The blocked passes over the movie allocate and free many block-sized buffers; glibc keeps freed blocks of up to
    32 MB in its heap (its mmap threshold adapts to them), so without this the resident size after a stage stays up
    to a few hundred MB above what is live, and the next stage's whole-movie arrays come on top of it.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


PREPARE_BLOCK = 1 << 22  # elements (16 MB of float32) per block of `bin_frames`' pass over the movie
# elements per block of `_prepare`'s filter pass (1 MB of float32: the filter's intermediates stay in a core's L2
# cache) and of its scoring pass (8 MB: the scans' (T, rows W) arrays stay near the cache); on 256x256x1000 (one core)
# 16 MB blocks took 0.89 s to filter and 0.97 s to score (with the |diff B| medians), these 0.43 and 0.66 s
FILTER_BLOCK = 1 << 18
SCORE_BLOCK = 1 << 21


@partial(jax.jit, donate_argnums=(0, 1))
def _fill_frames(Rp, Bp, Yb, median, g, box, t0):
    """Write frames t0.. of R = Y - median and of B = score_filter(R) into the interiors of the padded Rp, Bp.

    Rp and Bp are donated (updated in place); Yb (n, H, W) holds the movie's frames t0..t0+n-1.
    """
    H, W = median.shape
    pad = (Rp.shape[1] - H) // 2
    R = Yb.astype(Rp.dtype) - median
    B = score_filter(R, g, box)
    Rp = lax.dynamic_update_slice(Rp, R, (t0, pad, pad))
    Bp = lax.dynamic_update_slice(Bp, B, (t0, pad, pad))
    return Rp, Bp


# frames sampled for the host medians of `_prepare` (median image, noise of B): 1000 -> 400 took the warm
# initialisation of 256x256x3000 (binned to 1000 frames) from 17.4 to 11.9 s on one core with the same 159 components
# (P 0.925 R 0.980 against the truth); the sample median's sd is 1.25 / sqrt(400) = 0.06 of the noise sd
MEDIAN_SAMPLES = 400


@partial(jax.jit, static_argnames=("pad", "W", "rows", "n_smooth", "n_slow"))
def _score_rows(Bp, r0, *, pad, W, rows, n_smooth, n_slow):
    """Energy sum_t B^2, transient peak (`_peak_above_slow`) and |diff B| at up to MEDIAN_SAMPLES evenly spaced frames, for
    the image rows r0..r0+rows-1 of the padded filtered movie Bp (whole time series: the peak needs them)."""
    T = Bp.shape[0]
    B = lax.dynamic_slice(Bp, (0, r0 + pad, pad), (T, rows, W))
    dB = _evenly_spaced(jnp.abs(jnp.diff(B, axis=0)), MEDIAN_SAMPLES, 0)
    return jnp.sum(B * B, axis=0), _peak_above_slow(B, n_smooth, n_slow), dB


def _starts(n: int, size: int) -> list[int]:
    """Starts of blocks of `size` covering 0..n-1, the last one moved back to end at n (one block shape for all;
    the overlap is recomputed with the same result)."""
    return sorted({min(s, n - size) for s in range(0, n, size)})


def _block_of(Y, t0: int, n: int) -> jax.Array:
    """Frames t0..t0+n-1 of a numpy or jax movie as a jax array (only these frames are copied)."""
    return jax.device_put(Y[t0 : t0 + n]) if isinstance(Y, np.ndarray) else Y[t0 : t0 + n]


def _median0(x: np.ndarray) -> np.ndarray:
    """`np.median(x, axis=0)` of a finite floating (n, ...) array, bit for bit: one selection on the transposed
    (contiguous) pixel rows and, for even n, the max of the lower part as the other middle value. numpy's own axis-0
    median (two selections across strided rows) took 0.31 s on 334 x 256 x 256, this 0.09 s."""
    n = x.shape[0]
    rows = np.ascontiguousarray(x.reshape(n, -1).T)
    k = n // 2
    part = np.partition(rows, k, axis=1)
    mid = part[:, k] if n % 2 else (part[:, :k].max(axis=1) + part[:, k]) / np.asarray(2, x.dtype)
    return mid.reshape(x.shape[1:])


def _prepare(Y, g, box, *, pad, n_smooth, n_slow, frames_block: int = FILTER_BLOCK, rows_block: int = SCORE_BLOCK):
    """Median image, padded residual R = Y - median, its padded filtered version B, B's noise, energy and peak maps.

    Medians run on the host (numpy's selection is many times faster than a sort on XLA's CPU backend): the median
    image over at most MEDIAN_SAMPLES (400) evenly spaced frames, B's noise as median(|diff B|) / 0.6745 / sqrt 2.
    Everything is computed by blocks, so the memory used on top of the movie Y (numpy or jax, (T, H, W)) is the
    padded Rp and Bp and a few blocks: R and B by blocks of about `frames_block` elements of whole frames, written
    into preallocated Rp and Bp; the per-pixel energy, peak and noise (which need whole time series) by blocks of
    about `rows_block` elements of image rows.
    """
    T, H, W = Y.shape
    dtype = Y.dtype
    step = 1 if T <= MEDIAN_SAMPLES else -(-T // MEDIAN_SAMPLES)  # as `_evenly_spaced(Y, MEDIAN_SAMPLES)`
    rows = int(min(H, max(1, rows_block // max(1, T * W))))
    median = np.empty((H, W), dtype)
    # the host medians run in a thread per core (numpy's selection releases the GIL), and those of |diff B| while
    # XLA computes the next block's scores: 0.8 of the 2.5 s this took on 256x256 (1000 binned frames), 2 cores
    with Pool() as pool:
        def median_rows(r0):
            median[r0 : r0 + rows] = _median0(np.asarray(Y[::step, r0 : r0 + rows]))

        list(pool.map(median_rows, range(0, H, rows)))
        median = jnp.asarray(median)

        shape = (T, H + 2 * pad, W + 2 * pad)
        Rp, Bp = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        nt = int(min(T, max(1, frames_block // (H * W))))
        for t0 in _starts(T, nt):
            Rp, Bp = _fill_frames(Rp, Bp, _block_of(Y, t0, nt), median, g, box, jnp.asarray(t0, jnp.int32))
        Rp.block_until_ready()
        release_free_memory()  # else the C heap keeps the freed blocks (fragmentation)

        E, P, sn_b = (np.empty((H, W), dtype) for _ in range(3))

        def noise_rows(r0, dB):
            sn_b[r0 : r0 + rows] = _median0(dB)

        pending = []
        for r0 in _starts(H, rows):
            e, p, dB = _score_rows(Bp, jnp.asarray(r0, jnp.int32), pad=pad, W=W, rows=rows, n_smooth=n_smooth,
                                   n_slow=n_slow)
            E[r0 : r0 + rows], P[r0 : r0 + rows] = np.asarray(e), np.asarray(p)
            pending.append(pool.submit(noise_rows, r0, np.asarray(dB)))
            if len(pending) > 2:  # bound the |diff B| blocks held at once
                pending.pop(0).result()
            release_free_memory()
        for job in pending:
            job.result()
    sn_b = sn_b / (0.6744897501960817 * math.sqrt(2.0))
    sn_b = np.maximum(sn_b, np.finfo(np.dtype(dtype)).tiny)
    return median, Rp, Bp, sn_b, jnp.pad(jnp.asarray(E), pad), jnp.pad(jnp.asarray(P), pad)


def _cumsum0(x: jax.Array) -> jax.Array:
    """Cumulative sum along axis 0 as a sequential scan over frames, each step one vector add over the other axes
    (on XLA's CPU backend about 3x faster than an associative scan and 10x faster than `jnp.cumsum` on a
    (1000, 27000) array)."""
    flat = x.reshape(x.shape[0], -1)

    def step(acc, row):
        acc = acc + row
        return acc, acc

    return lax.scan(step, jnp.zeros_like(flat[0]), flat)[1].reshape(x.shape)


def _max_over(row, t0: int, t1: int) -> jax.Array:
    """max over t = t0..t1-1 of row(t) (t traced), as a sequential loop that never forms the (t1 - t0, ...) array
    (exact, like `jnp.max`). On XLA's CPU backend a max-reduction over the leading axis of a computed array runs ~6x
    slower than a scan over frames (40 vs 7 ms on (3000, 1681)), and the scan ~2.3x slower than this loop, which
    computes each row where it is used (`_peak_above_slow` on (1000, 1681): 2.9 vs 1.25 ms, the same values)."""
    return lax.fori_loop(t0 + 1, t1, lambda t, m: jnp.maximum(m, row(t)), row(t0))


def _peak_above_slow(x: jax.Array, n: int, half: int) -> jax.Array:
    """Peak of a transient in x (T, ...): max over t of the mean of n consecutive frames of x minus its slow part.

    The slow part is the running mean over 2 half + 1 frames (truncated at the ends), so slow background and
    neuropil drifts, which the spatial filter does not remove, do not count as peaks. One cumulative sum (a scan),
    then a loop over frames that takes each frame's difference from the sum's rows (`_max_over`; no gathers).
    """
    T = x.shape[0]
    half = min(half, T - 1)
    n = min(n, T)
    flat = x.reshape(T, -1)
    cs = _cumsum0(flat)  # cs[t] = x_0 + ... + x_t
    t = np.arange(T)
    count = jnp.asarray((np.minimum(t + half + 1, T) - np.maximum(t - half, 0)).astype(np.float32), x.dtype)

    def row(a, t):
        return lax.dynamic_index_in_dim(a, t, keepdims=False)

    def above_slow(t):  # x_t minus the mean of x over frames max(t - half, 0)..min(t + half, T - 1)
        hi = row(cs, jnp.minimum(t + half, T - 1))
        lo = jnp.where(t > half, row(cs, jnp.maximum(t - half - 1, 0)), 0.0)
        return row(flat, t) - (hi - lo) / count[t]

    if n <= 8:  # a few frames per step are cheaper than a second cumulative sum

        def sum_n(t):
            out = above_slow(t)
            for i in range(1, n):
                out = out + above_slow(t + i)
            return out

    else:
        cs2 = lax.scan(lambda acc, t: (acc + above_slow(t),) * 2, jnp.zeros_like(flat[0]), jnp.arange(T))[1]

        def sum_n(t):
            return row(cs2, t + n - 1) - jnp.where(t > 0, row(cs2, jnp.maximum(t - 1, 0)), 0.0)

    return (_max_over(sum_n, 0, T - n + 1) / n).reshape(x.shape[1:])


def _pick_centres(score: np.ndarray, eligible: np.ndarray, n: int, sep: int) -> list[tuple[int, int]]:
    """Greedy by score: up to n eligible pixels whose (2h+1)-windows do not overlap (Chebyshev distance > sep)."""
    flat = np.flatnonzero(eligible.ravel())
    if flat.size == 0:
        return []
    order = flat[np.argsort(-score.ravel()[flat], kind="stable")]
    W = score.shape[1]
    chosen: list[tuple[int, int]] = []
    for idx in order[: 50 * n]:
        r, c = divmod(int(idx), W)
        if all(max(abs(r - r2), abs(c - c2)) > sep for r2, c2 in chosen):
            chosen.append((r, c))
            if len(chosen) == n:
                break
    return chosen


def default_snr_stop(T: int, H: int, W: int, sigma: float, false_alarms: float = 0.01) -> float:
    """Peak-to-noise level that pure Gaussian noise exceeds about `false_alarms` times per movie after the blur.

    Each blurred frame of white noise is a smooth Gaussian field with correlation exp(-r^2 / (4 sigma^2)); the
    expected number of local maxima above u in a frame of H W pixels is about H W / (2 sigma^2) / (2 pi)^(3/2)
    u exp(-u^2 / 2) (the Euler-characteristic density of a 2-D field). Summed over T independent frames and set equal
    to `false_alarms`, this is solved for u (about 5.6 for 64x64x400 and sigma 2, about 6.4 for 256x256x3000).

    **Arguments:** `T`, `H`, `W` movie size; `sigma` blur sd in pixels; `false_alarms` expected false seeds per movie.

    **Returns:** the level u (float).
    """
    rate = T * H * W / (2.0 * sigma**2) / (2.0 * math.pi) ** 1.5 / false_alarms
    u = 3.0
    for _ in range(50):  # u = sqrt(2 log(rate u)), a contraction for u > 1
        u = math.sqrt(max(2.0 * math.log(max(rate * u, 1.0)), 1.0))
    return float(u)


def _embed_windows(windows: np.ndarray, corners, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Footprints A (d, K) from the greedy round's (K, w, w) windows, window k centred on pixel `corners[k]` (its
    top-left corner sits at that pixel minus w // 2; the parts outside the image are cut off), and their centres of
    mass as `_centres_of_mass` computes them, from the windows alone (no pass over the (d, K) array: on 256x256 with
    159 components the dense embedding and centres took 0.5 s of the initialisation)."""
    K, w, _ = windows.shape
    h = w // 2
    A = np.zeros((H * W, K), windows.dtype)
    centers = np.zeros((K, 2), np.float32)
    for k, (r0, c0) in enumerate(corners):
        top, left = r0 - h, c0 - h
        i0, i1 = max(0, -top), min(w, H - top)
        j0, j1 = max(0, -left), min(w, W - left)
        win = windows[k, i0:i1, j0:j1]
        rows = np.arange(top + i0, top + i1)
        cols = np.arange(left + j0, left + j1)
        A[(rows[:, None] * W + cols[None, :]).ravel(), k] = win.ravel()
        centers[k] = _centres_of_mass(win.reshape(-1, 1), *win.shape, origin=(rows[0], cols[0]))[0]
    return A, centers


def _centres_of_mass(A: jax.Array, H: int, W: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(K, 2) float32 (row, col) centre of mass of each column of A (d, K), weighted by a_k above 30% of its max;
    A covers the H x W crop whose top-left pixel is `origin` of the image."""
    wgt = np.asarray(A, np.float64)
    wgt = np.where(wgt >= 0.3 * wgt.max(axis=0, initial=0.0)[None, :], wgt, 0.0)
    rows, cols = np.divmod(np.arange(H * W), W)
    rows, cols = rows + origin[0], cols + origin[1]
    tot = np.maximum(wgt.sum(0), 1e-300)
    return (np.stack([rows @ wgt, cols @ wgt], axis=1) / tot[:, None]).astype(np.float32).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------------- background


def hals_rows(X: jax.Array, target: jax.Array, gram: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """One HALS sweep over the rows of X >= 0 for min ||M - W X||^2 with W fixed, given target = W'M and gram = W'W.

    Row k becomes max(0, X_k + (target_k - gram_k X) / gram_kk), in order, each row seeing the rows updated before it.
    The column update of W is the same sweep on the transposes (X -> W', target -> X M', gram -> X X').

    **Arguments:** `X` (K, n); `target` (K, n); `gram` (K, K); `keep` optional (K, n) bool: entries outside it stay 0.

    **Returns:** the updated X.
    """
    tiny = jnp.asarray(1e-12, X.dtype)

    def row(k, X):
        new = jnp.maximum(X[k] + (target[k] - gram[k] @ X) / jnp.maximum(gram[k, k], tiny), 0.0)
        return X.at[k].set(new if keep is None else jnp.where(keep[k], new, 0.0))

    return lax.fori_loop(0, X.shape[0], row, X)


@partial(jax.jit, static_argnames=("n_iter",))
def background_hals(M: jax.Array, b: jax.Array, f: jax.Array, n_iter: int = 5) -> tuple[jax.Array, jax.Array]:
    """Rank-nb non-negative factorisation M (d, T) ~ b f by HALS sweeps; f rows rescaled to mean 1 at the end.

    **Arguments:** `M` (d, T) data (may hold negative values); `b` (d, nb) >= 0 and `f` (nb, T) >= 0 starting values;
    `n_iter` sweeps (fixed; each is two passes over M).

    **Returns:** `(b, f)` non-negative, each row of f of mean 1 (rows that vanish are left at zero).
    """
    return _hals_background(lambda b: b.T @ M, lambda f: M @ f.T, b, f, n_iter)


def _hals_background(bM, Mf, b, f, n_iter: int):
    """`background_hals` given the two products with the data, `bM(b)` = b' M (nb, T) and `Mf(f)` = M f' (d, nb)
    (so M need not exist as one array)."""

    def sweep(_, bf):
        b, f = bf
        f = hals_rows(f, bM(b), b.T @ b)
        b = hals_rows(b.T, Mf(f).T, f @ f.T).T
        return b, f

    b, f = lax.fori_loop(0, n_iter, sweep, (b, f))
    s = jnp.mean(f, axis=1)
    ok = s > 0
    f = jnp.where(ok[:, None], f / jnp.where(ok, s, 1.0)[:, None], 0.0)
    b = b * jnp.where(ok, s, 0.0)[None, :]
    return b, f


@partial(jax.jit, static_argnames=("pad", "n_iter"))
def _greedy_background(Rp, static, b0, f0, *, pad, n_iter):
    """Background HALS on the greedy residual M = interior of Rp + a static image (d, T), never formed: the products
    with M are taken on the padded Rp as it is (maps embedded in the padded grid, zero on the border) plus the static
    image's part, so no movie-sized array is made."""
    T, Hp, Wp = Rp.shape
    H, W = static.shape
    d = H * W
    Rf = Rp.reshape(T, Hp * Wp)
    s = static.reshape(d)

    def embed(b):  # (d, nb) -> (Hp Wp, nb), zero on the border
        return jnp.pad(b.reshape(H, W, -1), ((pad, pad), (pad, pad), (0, 0))).reshape(Hp * Wp, -1)

    def bM(b):
        return (Rf @ embed(b)).T + (s @ b)[:, None]

    def Mf(f):
        inner = (f @ Rf).reshape(-1, Hp, Wp)[:, pad : pad + H, pad : pad + W].reshape(-1, d).T
        return inner + s[:, None] * jnp.sum(f, axis=1)[None, :]

    return _hals_background(bM, Mf, b0, f0, n_iter)


@partial(jax.jit, static_argnums=(1, 2))
def _background_start(median: jax.Array, T: int, nb: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """b starts at the clipped median image (first column) plus small random maps; f starts flat (plus jitter)."""
    d = median.size
    kb, kf = jax.random.split(key)
    b0 = jnp.maximum(median.reshape(d, 1), 0.0)
    scale = jnp.maximum(jnp.mean(b0), 1e-6)
    extra = scale * jax.random.uniform(kb, (d, nb - 1), dtype=median.dtype)
    b = jnp.concatenate([b0, extra], axis=1)
    f = jnp.ones((nb, T), median.dtype) + 0.1 * jax.random.uniform(kf, (nb, T), dtype=median.dtype) * (
        jnp.arange(nb) > 0
    )[:, None]
    return b, f


# ---------------------------------------------------------------------------------------------------- greedy init


def bin_frames(Y, k: int, block: int = PREPARE_BLOCK) -> np.ndarray:
    """Means of k consecutive frames of a (T, H, W) movie: (ceil(T / k), H, W), the last bin over what is left.

    Read in blocks of about `block` elements (a jax or numpy movie; only one block is copied at a time); the result
    is a numpy array of Y's floating dtype. k = 1 returns the frames as they are (as numpy).
    """
    T, H, W = Y.shape
    k = int(k)
    if k == 1:
        return np.asarray(Y)
    full, n_bins = T // k, -(-T // k)
    out = np.empty((n_bins, H, W), np.asarray(Y[:1]).dtype)
    step = max(1, block // (k * H * W))  # bins per block
    for j0 in range(0, full, step):
        j1 = min(full, j0 + step)
        out[j0:j1] = np.asarray(Y[j0 * k : j1 * k]).reshape(j1 - j0, k, H, W).mean(axis=1)
    if n_bins > full:
        out[full] = np.asarray(Y[full * k :]).mean(axis=0)
    return out


def unbin_traces(X, T: int, k: int) -> jax.Array:
    """Traces at the bins of `bin_frames(., k)` (n, ceil(T / k)) back at every frame (n, T): linear interpolation
    between bin centres, constant beyond the first and last centre (non-negative traces stay non-negative)."""
    X = jnp.asarray(X)
    if int(k) == 1:
        return X
    return _unbin(X, int(T), int(k))


@partial(jax.jit, static_argnums=(1, 2))
def _unbin(X, T: int, k: int) -> jax.Array:
    starts = np.arange(X.shape[1]) * k
    centres = jnp.asarray(0.5 * (starts + np.minimum(starts + k, T) - 1), X.dtype)
    t = jnp.arange(T, dtype=X.dtype)
    return jax.vmap(lambda x: jnp.interp(t, centres, x))(X)


BIN_SECONDS = 0.2
"""Length in seconds of the greedy initialisation's default bins when the frame rate is known (`default_tsub`).

Measured on simulated 256x256x3000 movies at 30 Hz (150 neurons, AR(2)), bins of 6 frames (0.2 s) against 3 (0.1 s,
the peak score's own averaging): F1 0.980 / 0.990 / 0.987 / 0.987 / 0.983 / 0.973 vs 0.983 / 0.963 / 0.968 / 0.990 /
0.970 / 0.962 (seeds 1-4, 6, 7; peak SNR 3-5, decay 0.15-0.5 s), median spike correlation 0.001-0.005 lower, and the
initialisation about 1.2 s (a third) faster. A dim cell's transient spans several bins either way, and the coarser
bins average more noise away; bins of 12 frames (0.4 s) lost recall on the fast-decaying cells (R 0.88 vs 0.95).
"""


def default_tsub(T: int, n_smooth: int, fps: float | None = None, min_bins: int = 200) -> int:
    """Frames per bin of the greedy initialisation when not given: the frames of `BIN_SECONDS` (0.2 s) when `fps` is
    known, at least `n_smooth` (the peak score averages that many frames anyway; it is the whole rule when `fps` is
    not known), fewer (down to `n_smooth`) where that would leave fewer than `min_bins` bins, and 1 (no binning) where
    even `n_smooth` would."""
    n_smooth = int(n_smooth)
    want = max(n_smooth, int(round(BIN_SECONDS * float(fps))) if fps else 0)
    for k in range(want, n_smooth - 1, -1):
        if k > 1 and T // k >= min_bins:
            return k
    return 1




def greedy_init(
    Y,
    radius: float,
    *,
    K: int | None = None,
    nb: int = 1,
    fps: float | None = None,
    max_iter_rank1: int = 10,
    snr_stop: float | None = None,
    n_smooth: int | None = None,
    n_slow: int | None = None,
    tsub: int | None = None,
    order_by: str = "energy",
    batch: int = 16,
    window: int | None = None,
    fit_radius: float | None = None,
    sigma: float | None = None,
    n_iter_background: int = 5,
    max_rounds: int | None = None,
    key: jax.Array | None = None,
) -> InitResult:
    """Greedy initialisation of somatic components (CaImAn's `greedyROI`; `radius` replaces its `gSig`).

    Algorithm (MATH.md, "Greedy initialisation"):

    0. Frames are averaged in bins of `tsub` (by default 0.2 s of frames when `fps` is given, else `n_smooth`, the
       frames the peak score averages anyway: `default_tsub`); steps 1-5 run on the binned movie, and the traces C
       and f are interpolated back to every frame at the end. Binning by 3 at 30 Hz cut the initialisation's time
       2.5x (38 -> 15 s on one core) and did not lose accuracy: simulated 256x256x3000 (150 neurons, peak SNR 4) F1
       0.961 / calcium corr 0.992 / spike corr 0.883 vs 0.952 / 0.992 / 0.878 unbinned (the fit after it refits
       every trace at the full rate); bins of 6 (0.2 s) cut another third and found more dim cells (`BIN_SECONDS`).
    1. R = Y minus each pixel's temporal median (over at most 400 evenly spaced frames); B = R with every frame
       filtered by a Gaussian of sd `sigma` minus its mean over a (2 window + 1)^2 square (`score_kernels`: a
       centre-surround filter, so smooth background and neuropil fluctuations do not look like neurons).
    2. Per pixel: energy E = sum_t B^2, noise s = robust sd of B's first differences / sqrt 2, and peak-to-noise
       psnr = max_t (mean over `n_smooth` consecutive frames of B minus its running mean over 2 `n_slow` + 1
       frames) sqrt(n_smooth) / s (a transient lasts several frames, noise averaged over n frames has sd
       s / sqrt(n), and slow drifts are not transients). A pixel is *eligible* when psnr >= `snr_stop` (it
       holds a transient that noise alone would not produce).
    3. Each round: take up to `batch` eligible pixels, greedily by energy (or by psnr, `order_by="peak"`), whose
       (2 window + 1)^2 windows do not overlap; in each window remove the local background (per frame, the median
       over the window's border) and fit c a' with a >= 0 on a disc of `fit_radius` around the seed (rank 1,
       `max_iter_rank1` alternating projected least-squares steps started from a Gaussian blob; c keeps its sign,
       since an active neuron's quiet frames sit below the pixel median); subtract a c' from R and filter(a) c'
       from B, and re-score the touched pixels. The component's trace is C = max(c - q, 0) with q the 20th
       percentile of c (a q goes to the background). All windows of a round are fitted at once (vmap); every round
       uses one compiled shape (the movies are padded).
    4. Stop when no pixel is eligible any more, when K components were found, or after `max_rounds` rounds.
       A seed whose fit comes out empty, or lowers the seed's own psnr by less than `snr_stop` / 2 (the window's
       main structure is something else), is dropped and no seed is taken within radius / 2 of it again.
    5. Background: b, f = rank-`nb` HALS factorisation of Y - A C (started from the median image and a flat trace).

    **Arguments:**

    - `Y`: movie (T, H, W) in memory (numpy or jax array; integers are converted to float32). Must be finite.
    - `radius`: neuron radius in pixels (> 0).
    - `K`: optional upper bound on the number of components (None: stop by the noise rule only).
    - `nb`: background rank (>= 1).
    - `fps`: frame rate in Hz, if known; sets the defaults of `n_smooth` and `n_slow`.
    - `max_iter_rank1`: alternations of the rank-1 window fit.
    - `snr_stop`: eligibility level of the peak-to-noise; None -> `default_snr_stop(T // n_smooth, H, W, sigma)`
      (the level pure noise exceeds about once in 100 movies of this size) plus 1, a margin for background and
      neuropil that are not white noise.
    - `n_smooth`: frames averaged for the peak (None: 3, or 0.1 s of frames when `fps` is given, at least 3).
    - `n_slow`: half-width in frames of the running mean removed before the peak (None: 60, or 2 s of frames when
      `fps` is given, at least 30).
    - `tsub`: frames per bin (CaImAn's `tsub`); None -> `default_tsub(T, n_smooth, fps)` (0.2 s of frames when `fps`
      is given, at least `n_smooth`; fewer where that leaves under 200 bins, 1 where even `n_smooth` does); 1 turns
      binning off. `n_smooth` and `n_slow` stay in frames (rounded to bins).
    - `batch`: most components found per round (they are fitted together).
    - `order_by`: "energy" (MATH.md) or "peak": which score orders the eligible seeds.
    - `window`: half-width of the fitting window (and of the score filter's square) in pixels;
      None -> ceil(2.5 radius).
    - `fit_radius`: radius in pixels of the disc around the seed on which the footprint is fitted; None -> 1.5 radius.
      On the whole window, a dim neuron with a few transients (most cells of a real recording) holds less energy than
      the noise's leading non-negative direction, so the fit drifts to noise and fails the progress check: on
      neurofinder_tr 453 of 463 seeds were dropped that way with the whole window, and the init found 11 components.
    - `sigma`: sd of the Gaussian of the score filter in pixels; None -> radius / 2.
    - `n_iter_background`: HALS sweeps of the final background fit.
    - `max_rounds`: most rounds; None -> enough for a field packed with neurons (H W / radius^2 / batch, at least 4).
    - `key`: PRNG key for the starting maps of background components 2..nb (default PRNGKey(0)); the result is
      deterministic for a given key.

    **Returns:** an `InitResult` (A (d, K) unit-norm columns, C (K, T), b (d, nb), f (nb, T), centers (K, 2), median
    (H, W), psnr (K,)), components in the order found.
    """
    Y = _as_movie(Y, host=True)
    T, H, W = Y.shape
    r = _check_radius(radius, H, W)
    if K is not None and (int(K) != K or K < 0):
        raise ParameterError(f"K={K!r}: the most components to find must be a non-negative integer (or None).")
    if int(nb) != nb or nb < 1:
        raise ParameterError(f"nb={nb!r}: the background rank must be an integer >= 1.")
    if batch < 1 or max_iter_rank1 < 1:
        raise ParameterError(f"batch={batch!r}, max_iter_rank1={max_iter_rank1!r}: both must be >= 1.")
    sigma = float(sigma) if sigma is not None else r / 2.0
    h = int(window) if window is not None else int(math.ceil(2.5 * r))
    if sigma <= 0 or h < 1:
        raise ParameterError(f"sigma={sigma!r}, window={window!r}: both must be positive.")
    fit_radius = float(fit_radius) if fit_radius is not None else 1.5 * r
    if not fit_radius > 0:
        raise ParameterError(f"fit_radius={fit_radius!r}: the radius of the footprint's fitting disc must be positive.")
    if n_smooth is None:
        n_smooth = 3 if fps is None else max(3, int(round(0.1 * float(fps))))
    n_smooth = int(n_smooth)
    if not 1 <= n_smooth <= T:
        raise ParameterError(f"n_smooth={n_smooth!r}: must be between 1 and the number of frames ({T}).")
    if order_by not in ("peak", "energy"):
        raise ParameterError(f"order_by={order_by!r}: choose 'peak' or 'energy'.")
    if n_slow is None:
        n_slow = 60 if fps is None else max(30, int(round(2.0 * float(fps))))
    n_slow = int(n_slow)
    if n_slow < 1:
        raise ParameterError(f"n_slow={n_slow!r}: the half-width of the slow running mean must be >= 1 frame.")
    if tsub is None:
        tsub = default_tsub(T, n_smooth, fps)
    whole = isinstance(tsub, (int, float, np.integer, np.floating)) and not isinstance(tsub, bool)
    whole = whole and math.isfinite(tsub) and tsub == int(tsub)
    if not (whole and 1 <= tsub <= max(1, T // 3)):
        raise ParameterError(f"tsub={tsub!r}: frames per bin must be an integer from 1 to T / 3 ({T // 3}).")
    tsub = int(tsub)
    T_full = T
    if tsub > 1:
        Y = bin_frames(Y, tsub)
        T = Y.shape[0]
        n_smooth, n_slow = max(1, round(n_smooth / tsub)), max(1, round(n_slow / tsub))
    if snr_stop is None:
        snr_stop = default_snr_stop(T // n_smooth, H, W, sigma) + 1.0
    if max_rounds is None:
        max_rounds = max(4, int(math.ceil(H * W / (r * r) / batch)))
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = Y.dtype

    g_np, box_np = score_kernels(sigma, h)
    # host arrays go to the device with `device_put` and are sliced on the host: eager jnp conversions and slices
    # are each a program of their own to compile (or load from the cache) at a process's first fit
    g, box = jax.device_put(g_np.astype(dtype)), jax.device_put(box_np.astype(dtype))
    hb = h + g_np.size // 2
    pad = hb

    median, Rp, Bp, sn_b, Ep, Pp = _prepare(Y, g, box, pad=pad, n_smooth=n_smooth, n_slow=n_slow)
    sn_b = np.asarray(sn_b)
    E = np.asarray(Ep)[pad : pad + H, pad : pad + W]
    P = np.asarray(Pp)[pad : pad + H, pad : pad + W]

    w = 2 * h + 1
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    a0 = jax.device_put(np.exp(-0.5 * (yy**2 + xx**2) / (max(r, 1.0) / 1.5) ** 2).ravel().astype(dtype))
    support = np.hypot(yy, xx) <= fit_radius
    hs = int(np.abs(yy[support]).max())  # the support's half-width; filter(a) reaches hs + hb - h
    support = jax.device_put(support.ravel())
    inside = jax.device_put(np.pad(np.ones((H, W), bool), pad))
    snp = jax.device_put(np.pad(sn_b, pad, constant_values=1.0).astype(dtype))

    excluded = np.zeros((H, W), bool)
    e = max(1, int(round(r / 2)))  # half-width of the square kept free of seeds around a dropped one
    K_max = np.inf if K is None else int(K)
    found_a, found_c, found_rc, found_psnr, found_q = [], [], [], [], []
    for _ in range(max_rounds):
        n_left = K_max - len(found_rc)
        if n_left <= 0:
            break
        psnr = P * math.sqrt(n_smooth) / sn_b
        eligible = (psnr >= snr_stop) & ~excluded
        chosen = _pick_centres(psnr if order_by == "peak" else E, eligible, int(min(batch, n_left)), 2 * h)
        if not chosen:
            break
        n = len(chosen)
        centres = np.zeros((batch, 2), np.int32)
        centres[:n] = chosen
        valid = np.arange(batch) < n
        centres = jax.device_put(centres)
        ring_med = _ring_medians(Rp, centres, inside, h=h, pad=pad)
        Rp, Bp, a, c, q, kept = _greedy_round(
            Rp, Bp, centres, jax.device_put(valid), a0, support, inside, g, box, snp,
            np.asarray(snr_stop, dtype), ring_med, h=h, hb=hb, hs=hs, pad=pad,
            n_iter=int(max_iter_rank1), n_smooth=n_smooth, n_slow=n_slow,
        )
        kept = np.asarray(kept)
        # only the windows of kept fits changed (a dropped fit subtracts nothing): the same maps, less work (on
        # neurofinder_tr 32 of 134 seeds are dropped)
        touched = [rc for rc, k in zip(chosen, kept) if k]
        Ep, Pp = _rescore(Bp, Ep, Pp, touched, hf=hs + hb - h, pad=pad, n_smooth=n_smooth, n_slow=n_slow)
        E = np.asarray(Ep)[pad : pad + H, pad : pad + W]
        P = np.asarray(Pp)[pad : pad + H, pad : pad + W]
        a, q = np.asarray(a), np.asarray(q)
        c = np.maximum(np.asarray(c) - q[:, None], 0)  # the trace above its baseline; a q goes to the background
        energy = np.sum(c * c, axis=1)
        for k, (r0, c0) in enumerate(chosen):
            if not (kept[k] and energy[k] > 0):  # no seed here again
                excluded[max(0, r0 - e) : r0 + e + 1, max(0, c0 - e) : c0 + e + 1] = True
                continue
            found_a.append(a[k])
            found_c.append(c[k])
            found_rc.append((r0, c0))
            found_psnr.append(psnr[r0, c0])
            found_q.append(q[k])

    Kf = len(found_rc)
    d = H * W
    if Kf:
        A, centers = _embed_windows(np.stack(found_a), found_rc, H, W)
        C = np.stack(found_c)
    else:
        A = np.zeros((d, 0), dtype)
        C = np.zeros((0, T), dtype)
        centers = np.zeros((0, 2), np.float32)
    A, C = jax.device_put(A), jax.device_put(C)

    # Rp's interior is R - sum_k a_k (c_k + q_k)' and C holds max(c_k, 0), so Y - A C = Rp + median + A q up to the
    # clipped parts of C (small): the baselines a_k q_k are static images that the background absorbs
    static = _static_image(median, A, np.asarray(found_q, dtype).reshape(Kf)) if Kf else median
    del Bp, Ep, Pp  # the filtered movie is done with: free it before the background fit forms its (d, T) copy
    b0, f0 = _background_start(median, T, int(nb), key)
    b, f = _greedy_background(Rp, static, b0, f0, pad=pad, n_iter=int(n_iter_background))
    return InitResult(
        A=A,
        C=unbin_traces(C, T_full, tsub),
        b=b,
        f=unbin_traces(f, T_full, tsub),
        centers=jax.device_put(centers),
        median=median,
        psnr=jax.device_put(np.asarray(found_psnr, np.float32)),
    )


@jax.jit
def _static_image(median, A, q):
    """The median image plus the components' baselines A q, (H, W)."""
    return median + (A @ q).reshape(median.shape)


# -------------------------------------------------------------------------------------------------- sparse NMF init


@partial(jax.jit, static_argnames=("n_iter",))
def _sparse_hals(X: jax.Array, A: jax.Array, C: jax.Array, sparsity: jax.Array, n_iter: int):
    """HALS for X (d, T) ~ A C with A, C >= 0 and an l1 penalty `sparsity` * max(X) * sum(A); rows of C unit max."""
    K = A.shape[1]
    tiny = jnp.asarray(1e-12, X.dtype)
    lam = sparsity * jnp.max(X)

    def sweep(_, AC):
        A, C = AC
        AX = A.T @ X
        AA = A.T @ A
        for k in range(K):
            C = C.at[k].set(jnp.maximum(C[k] + (AX[k] - AA[k] @ C) / jnp.maximum(AA[k, k], tiny), 0.0))
        s = jnp.max(C, axis=1)
        C = C / jnp.maximum(s, tiny)[:, None]
        A = A * s[None, :]
        XC = X @ C.T
        CC = C @ C.T
        for k in range(K):
            A = A.at[:, k].set(
                jnp.maximum(A[:, k] + (XC[:, k] - A @ CC[:, k] - lam * CC[k, k]) / jnp.maximum(CC[k, k], tiny), 0.0)
            )
        return A, C

    return lax.fori_loop(0, n_iter, sweep, (A, C))


def sparse_nmf_init(
    Y,
    K: int,
    *,
    nb: int = 1,
    sparsity: float = 0.05,
    n_iter: int = 100,
    n_iter_background: int = 5,
    key: jax.Array | None = None,
) -> InitResult:
    """Sparse NMF start for dendrites and axons (no blob shape assumed): the fit's `init="sparse_nmf"`.

    The movie minus each pixel's median is clipped at zero (X = max(Y - median, 0), the active part) and factorised
    as X ~ A C with A, C >= 0 by HALS with an l1 penalty `sparsity * max(X)` on every footprint weight; rows of C are
    kept at unit max during the sweeps. Starting footprints: K pixels drawn with probability proportional to their
    temporal variance (from `key`), each with its own trace as the start of C. Components are then ordered by energy
    (||a_k||^2 ||c_k||^2, largest first), empty ones dropped, and columns of A scaled to unit l2 norm (C rescaled).
    The background is a rank-`nb` HALS factorisation of Y - A C, as in `greedy_init`.

    **Arguments:**

    - `Y`: movie (T, H, W), finite.
    - `K`: number of components to fit (>= 1; empty ones are dropped, so fewer may come back).
    - `nb`: background rank (>= 1).
    - `sparsity`: l1 weight on A relative to the movie's largest value (0 = plain NMF; larger = smaller footprints).
    - `n_iter`: HALS sweeps (fixed).
    - `n_iter_background`: HALS sweeps of the background fit.
    - `key`: PRNG key for the seed pixels (default PRNGKey(0)).

    **Returns:** an `InitResult`; `centers` are the footprints' centres of mass, `psnr` the components' energies.
    """
    Y = _as_movie(Y)
    T, H, W = Y.shape
    d = H * W
    if int(K) != K or K < 1:
        raise ParameterError(f"K={K!r}: sparse_nmf_init needs the number of components, an integer >= 1.")
    if int(nb) != nb or nb < 1:
        raise ParameterError(f"nb={nb!r}: the background rank must be an integer >= 1.")
    if not (sparsity >= 0):
        raise ParameterError(f"sparsity={sparsity!r}: must be >= 0.")
    K = int(K)
    key = jax.random.PRNGKey(0) if key is None else key
    kseed, kbg = jax.random.split(key)
    dtype = Y.dtype

    median = jnp.median(Y, axis=0)
    R = (Y - median).reshape(T, d).T  # (d, T)
    X = jnp.maximum(R, 0.0)
    var = jnp.mean(X * X, axis=1)
    p = var / jnp.maximum(jnp.sum(var), jnp.finfo(dtype).tiny)
    seeds = jax.random.choice(kseed, d, (min(K, d),), replace=False, p=p)
    A0 = jnp.zeros((d, K), dtype).at[seeds, jnp.arange(seeds.shape[0])].set(1.0)
    C0 = X[seeds]
    C0 = C0 / jnp.maximum(jnp.max(C0, axis=1, keepdims=True), 1e-12)
    A, C = _sparse_hals(X, A0 * jnp.max(X), C0, jnp.asarray(sparsity, dtype), n_iter=int(n_iter))

    na = jnp.sqrt(jnp.sum(A * A, axis=0))
    energy = np.asarray(na**2 * jnp.sum(C * C, axis=1))
    keep = np.flatnonzero(energy > 0)
    keep = keep[np.argsort(-energy[keep], kind="stable")]
    A = A[:, keep] / na[keep][None, :]
    C = C[keep] * na[keep][:, None]
    centers = _centres_of_mass(A, H, W)

    M = R - A @ C + median.reshape(d, 1)
    b0, f0 = _background_start(median, T, int(nb), kbg)
    b, f = background_hals(M, b0, f0, n_iter=int(n_iter_background))
    return InitResult(
        A=A,
        C=C,
        b=b,
        f=f,
        centers=jnp.asarray(centers),
        median=median,
        psnr=jnp.asarray(energy[keep].astype(np.float32)),
    )
