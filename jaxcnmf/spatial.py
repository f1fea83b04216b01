"""Spatial update of the CNMF fit: footprints A and background b given the traces C and f, plus search areas and
footprint clean-up. Sits between the initialisation / temporal update and the background / merge stages of `fit`.

Internal layout: Yr (d, T) with d = H*W pixels in row-major order, A (d, K), C (K, T), b (d, nb), f (nb, T), sn (d,).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import ndimage

from .errors import ParameterError

__all__ = [
    "update_spatial",
    "search_areas",
    "cleanup_footprints",
    "spatial_statistics",
    "candidate_statistics",
    "solve_pixel",
]


# ------------------------------------------------------------------------------------------------------- search areas


def _disk(radius: float) -> np.ndarray:
    half = int(math.floor(radius))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return (yy**2 + xx**2 <= radius**2 + 1e-9).astype(np.float32)


def _area_element(radius: float, compact: bool) -> tuple[np.ndarray, int]:
    """The dilation of `search_areas`: (structuring element, times applied)."""
    if compact:
        return _disk(radius) > 0.5, 1
    return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool), max(1, int(round(radius / 2)))


def search_areas(
    A,
    shape: tuple[int, int],
    radius: float,
    *,
    threshold: float = 0.1,
    compact: bool = True,
) -> jax.Array:
    """Where each footprint may grow in the next spatial update: its thresholded support, dilated.

    The support of a_k is {i : a_ik > threshold * max_i a_ik}. With `compact=True` (somata; CaImAn's `dist`/ellipse
    search) it is dilated by a disk of `radius` pixels, so a footprint can grow by up to one neuron radius. With
    `compact=False` (dendrites, axons) the dilation follows the shape itself: a 3x3 cross applied
    max(1, round(radius / 2)) times, so thin processes get a thin search band rather than a blob.
    Host-side (numpy, `scipy.ndimage.binary_dilation`), each component on the crop around its support that the
    dilation can reach: footprints are local, so this is ~100x less work than dilating whole images (2.5 s -> 0.03 s
    for 164 components of 256x256).

    **Arguments:**

    - `A`: (d, K) footprints, d = H*W (row-major).
    - `shape`: (H, W) of the field of view.
    - `radius`: neuron radius in pixels (> 0).
    - `threshold`: fraction of each footprint's maximum below which a weight is not part of its support.
    - `compact`: disk dilation (somata) or shape-following dilation (dendrites).

    **Returns:** bool (d, K); all False for an empty column.
    """
    H, W = int(shape[0]), int(shape[1])
    A = jnp.asarray(A)
    if A.ndim != 2 or A.shape[0] != H * W:
        raise ParameterError(f"A: expected shape (H*W, K) = ({H * W}, K) for shape={shape}, got {A.shape}.")
    if not radius > 0:
        raise ParameterError(f"radius={radius!r}: must be a positive number of pixels.")
    K = A.shape[1]
    if K == 0:
        return jnp.zeros((H * W, 0), bool)
    element, n_apply = _area_element(float(radius), bool(compact))
    margin = (element.shape[0] // 2) * n_apply
    host = np.asarray(A)
    peak = host.max(axis=0)
    support = (host > np.asarray(threshold, host.dtype) * peak) & (peak > 0)  # the rule in A's precision
    masks = support.reshape(H, W, K)
    out = np.zeros((H, W, K), bool)
    for k, (r0, r1, c0, c1) in enumerate(_boxes(support, H, W, margin)):
        if r1 > r0:
            out[r0:r1, c0:c1, k] = ndimage.binary_dilation(np.ascontiguousarray(masks[r0:r1, c0:c1, k]),
                                                           structure=element, iterations=n_apply)
    return jax.device_put(out.reshape(H * W, K))


def _boxes(mask: np.ndarray, H: int, W: int, m: int) -> list[tuple[int, int, int, int]]:
    """Per column of a (H*W, K) bool `mask`, the box `(r0, r1, c0, c1)` (rows r0..r1-1, columns c0..c1-1) of its True
    pixels, widened by `m` pixels and clipped to the image; `(0, 0, 0, 0)` for an all-False column. From which rows
    and which columns of each column's image hold a True pixel (two reductions of the mask in its own layout: the
    list of True pixels by column, `np.nonzero(mask.T)`, took 36 ms for 256x256 x 150, these 3 ms)."""
    K = mask.shape[1]
    M = mask.reshape(H, W, K)
    rows, cols = M.any(axis=1), M.any(axis=0)  # (H, K), (W, K)
    boxes = np.stack([
        np.maximum(rows.argmax(axis=0) - m, 0), np.minimum(H - rows[::-1].argmax(axis=0) + m, H),
        np.maximum(cols.argmax(axis=0) - m, 0), np.minimum(W - cols[::-1].argmax(axis=0) + m, W),
    ], axis=1)
    boxes = np.where(rows.any(axis=0)[:, None], boxes, 0)
    return [tuple(int(v) for v in row) for row in boxes]


# ---------------------------------------------------------------------------------------------------------- clean-up


def cleanup_footprints(
    A,
    shape: tuple[int, int],
    *,
    connected: bool = True,
    min_weight: float = 0.01,
    normalise: bool = True,
    median: int = 1,
):
    """Post-process footprints: smooth out speckle, keep the main connected piece, drop tiny weights, scale columns to
    unit l2 norm.

    For each column a_k: (1) weights below `min_weight * max(a_k)` are set to zero; (2) with `median > 1` the footprint
    image is replaced by its `median` x `median` median filter (zeros outside the field of view; CaImAn's `medw`),
    and (1) is applied again with the new maximum; (3) with `connected=True` only the 8-connected piece of the
    remaining support holding the largest energy (sum of a^2) is kept (somata; use `connected=False` for dendrites,
    whose branches may look disconnected); (4) with `normalise=True` the column is divided by its l2 norm. Host-side
    post-processing (scipy.ndimage), not differentiable.

    The median filter is for somata: a dim cell's footprint from a least-squares update on noisy pixels is speckled
    (every pixel's noise above zero is kept, below is clipped), and its pieces fall apart at any threshold; a 3 x 3
    median keeps a blob of a neuron's size whole and removes isolated pixels. It would erase processes one or two
    pixels wide: keep `median=1` for dendrites and axons.

    **Arguments:**

    - `A`: (d, K) non-negative footprints, d = H*W (row-major).
    - `shape`: (H, W).
    - `connected`: keep only the most energetic connected piece.
    - `min_weight`: relative weight below which a pixel is dropped (0 keeps all positive weights).
    - `normalise`: scale each non-empty column to unit l2 norm.
    - `median`: odd size in pixels of the median filter (1: none).

    **Returns:** `(A_clean, norms)`: A_clean (d, K) (same dtype as A), norms (K,) the l2 norm of each cleaned column
    before normalisation (zero for an empty one). The caller keeps the model A C unchanged by `C *= norms[:, None]`.
    """
    H, W = int(shape[0]), int(shape[1])
    A_in = jnp.asarray(A)
    if A_in.ndim != 2 or A_in.shape[0] != H * W:
        raise ParameterError(f"A: expected shape (H*W, K) = ({H * W}, K) for shape={shape}, got {A_in.shape}.")
    if isinstance(median, bool) or not isinstance(median, (int, np.integer)) or median < 1 or median % 2 == 0:
        raise ParameterError(f"median={median!r}: expected an odd number of pixels >= 1 (1: no median filter).")
    m = int(median) // 2  # the filter's reach: the crops are widened by it (zeros there after step 1)
    host = np.asarray(A_in)
    K = host.shape[1]
    img = host.reshape(H, W, K)
    out = np.zeros((H, W, K), np.dtype(A_in.dtype))
    norms = np.zeros(K, np.float64)
    # each footprint is cleaned on the crop of the weights the threshold keeps (footprints are local: labelling the
    # whole image of every column took ~1 s for 164 components of 256x256); an empty footprint stays zero. The crops
    # come from the kept weights' pixel lists (one comparison over A), not from (H, W, block) float64 work arrays:
    # those took 0.27-0.36 s of the 0.3-0.4 s a call cost inside a fit (fresh pages after each stage's malloc_trim),
    # now 0.12-0.13 s
    peak = np.maximum(host.max(axis=0, initial=0.0), 0.0).astype(np.float64)
    kept = (host >= min_weight * peak) & (host > 0)  # step 1's rule (float64 threshold)
    for k, (r0, r1, c0, c1) in enumerate(_boxes(kept, H, W, m)):
        if r1 <= r0:
            continue
        crop = np.maximum(np.asarray(img[r0:r1, c0:c1, k], np.float64), 0.0)
        # past the crop the filter sees zeros: outside the image by definition, inside because step 1 zeroes every
        # weight outside the box of the kept ones (the crop reaches m pixels past it)
        a, n = _cleanup_columns(crop.reshape(-1, 1), r1 - r0, c1 - c0, connected, min_weight, normalise, median)
        out[r0:r1, c0:c1, k] = a.reshape(r1 - r0, c1 - c0)
        norms[k] = n[0]
    return jax.device_put(out.reshape(H * W, K)), jax.device_put(norms.astype(np.dtype(A_in.dtype)))


def _cleanup_columns(a: np.ndarray, H: int, W: int, connected: bool, min_weight: float, normalise: bool,
                     median: int = 1):
    """`cleanup_footprints` on the float64 columns a (d, k) of an H x W image (modified in place); returns (cleaned a,
    norms)."""
    K = a.shape[1]
    a = np.maximum(a, 0.0, out=a)
    peak = a.max(axis=0, initial=0.0)
    a[a < min_weight * peak[None, :]] = 0.0
    if median > 1 and K:
        img = ndimage.median_filter(a.T.reshape(K, H, W), size=(1, median, median), mode="constant", cval=0.0)
        a = np.ascontiguousarray(img.reshape(K, H * W).T)
        peak = a.max(axis=0, initial=0.0)
        a[a < min_weight * peak[None, :]] = 0.0
    if connected and K:
        stack = a.T.reshape(K, H, W)
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = True  # 8-connectivity within a plane, none across components
        labels, n = ndimage.label(stack > 0, structure=structure)
        if n:
            energy = ndimage.sum_labels(stack**2, labels, index=np.arange(1, n + 1))
            owner = ndimage.maximum(np.arange(K)[:, None, None] * np.ones_like(labels), labels, np.arange(1, n + 1))
            owner = np.asarray(owner, int)
            best = np.zeros(K, int)
            best_e = np.full(K, -1.0)
            for lab, (k, e) in enumerate(zip(owner, energy), start=1):
                if e > best_e[k]:
                    best_e[k], best[k] = e, lab
            keep = labels == best[:, None, None]
            stack = np.where(keep & (labels > 0), stack, 0.0)
            a = stack.reshape(K, H * W).T
    norms = np.sqrt((a**2).sum(axis=0))
    if normalise:
        a = a / np.where(norms > 0, norms, 1.0)[None, :]
    return a, norms


# ---------------------------------------------------------------------------------------------- sufficient statistics


def spatial_statistics(Yr, C, b, f, *, block: int = 4096):
    """One pass over the movie: the per-pixel statistics the spatial update needs.

    With F = [C; f] ((K + nb), T) and r_i = y_i - b_i f (each pixel minus its current background, which keeps the
    float32 sums well conditioned on movies with a large baseline):

    **Arguments:** `Yr` (d, T); `C` (K, T); `b` (d, nb); `f` (nb, T); `block` pixels per chunk of the pass.

    **Returns:** `(Q, G, rr)`: Q = R F' (d, K + nb), G = F F' (K + nb, K + nb), rr = ||r_i||^2 (d,).
    """
    Yr = jnp.asarray(Yr)
    F = jnp.concatenate([C, f], axis=0).astype(Yr.dtype)
    return _statistics(Yr, F, b.astype(Yr.dtype), f.astype(Yr.dtype), block=int(max(1, min(block, Yr.shape[0]))))


@partial(jax.jit, static_argnames=("block",))
def _statistics(Yr, F, b, f, *, block):
    """`spatial_statistics` by blocks of `block` pixels read in place from Yr (the pixels past the last whole block
    form one shorter block), so no copy of the movie is made."""
    d, T = Yr.shape
    G = F @ F.T

    def one(y, bb):
        r = y - bb @ f
        return r @ F.T, jnp.sum(r * r, axis=1)

    nblk = d // block
    starts = jnp.arange(nblk) * block
    Q, rr = lax.map(
        lambda s: one(lax.dynamic_slice_in_dim(Yr, s, block), lax.dynamic_slice_in_dim(b, s, block)), starts
    )
    Q, rr = Q.reshape(nblk * block, -1), rr.reshape(nblk * block)
    if nblk * block < d:
        Qt, rrt = one(Yr[nblk * block :], b[nblk * block :])
        Q, rr = jnp.concatenate([Q, Qt]), jnp.concatenate([rr, rrt])
    return Q, G, rr


def candidate_statistics(Yr, C, b, f, search, idx, valid, slots, *, block: int = 4096):
    """What the pixels' problems use of `spatial_statistics`, without the dense (d, K + nb) product: `qs` (d, m + nb),
    each pixel's entries of Q = R F' at its candidates `idx` (zero at invalid slots) and at the nb background terms,
    with G = F F' and rr = ||r_i||^2.

    The candidates' entries come from each component's search-area pixels (a (P, T) gather of Yr rows per component
    times its trace; the pixel lists are read off `idx`, `valid` and `slots`, which hold each (pixel, component) pair
    of the search areas once, ordered as `temporal.column_pixels(search)` orders them), the background's from one
    pass over the movie (R f', ||r||^2).
    On simulated 256x256x3000 with 159 components the search areas hold 38k (pixel, component) pairs against the
    dense product's 10.4M: one core 0.35 s instead of 0.53 s (the background pass 0.15 s, the components' products
    0.09 s), and the whole update 0.91 -> 0.71 s. The sums run in another order than the dense
    product's (equal to float32 rounding). Differentiable with respect to Yr, C, b and f.

    **Arguments:** `Yr` (d, T); `C` (K, T); `b` (d, nb); `f` (nb, T); `search` (d, K) host bool search areas;
    `idx`, `valid`, `slots` (d, m) from `_candidates(search)`; `block`: pixels per chunk of the background pass.

    **Returns:** `(qs, G, rr)`.
    """
    from .temporal import bucket

    Yr = jnp.asarray(Yr)
    dt = Yr.dtype
    d, m = idx.shape
    K = search.shape[1]
    blk = int(max(1, min(block, d)))
    lists = None  # no pixel has a candidate: zero candidate entries
    if K and search.any():
        rows, cols = np.nonzero(valid)
        comp, pos = idx[rows, cols], slots[rows, cols]
        pix = np.zeros((K, bucket(int(np.bincount(comp, minlength=K).max(initial=1)))), np.int32)
        pix[comp, pos] = rows  # (K, P): each component's pixels in increasing order, then padding pixel 0 (never read)
        put = lambda x, t: jax.device_put(np.asarray(x, t))  # noqa: E731  (host arrays: no conversion programs)
        lists = (put(pix, np.int32), put(idx, np.int32), put(valid, bool), put(slots, np.int32))
    return _candidate_products(lists, Yr, C.astype(dt), b.astype(dt), f.astype(dt), m=m, block=blk)


@partial(jax.jit, static_argnames=("m", "block"))
def _candidate_products(lists, Yr, C, b, f, *, m, block):
    """The body of `candidate_statistics` after its host bookkeeping, in one compiled program: `lists` is
    `(pix, idx, valid, slots)`, or None for zero candidate entries (m of them per pixel)."""
    F = jnp.concatenate([C, f], axis=0)
    Qb, _, rr = _statistics(Yr, f, b, f, block=block)
    if lists is None:
        qc = jnp.zeros((Yr.shape[0], m), Yr.dtype)
    else:
        pix, idx, valid, slots = lists
        qc = jnp.where(valid, _component_products(pix, Yr, C, b, f)[idx, slots], 0)
    return jnp.concatenate([qc, Qb], axis=1), F @ F.T, rr


@jax.jit
def _component_products(pix, Yr, C, b, f):
    """Row k: R[pix[k]] c_k = Yr[pix[k]] c_k - b[pix[k]] (f c_k), one component at a time (a (P, T) gather each)."""
    fC = f @ C.T  # (nb, K)
    return lax.map(lambda a: Yr[a[0]] @ a[1] - b[a[0]] @ a[2], (pix, C, fC.T))


# ------------------------------------------------------------------------------------------------- per-pixel solver


def _cd(x, G, q, lam_w, lo, free, n_sweeps):
    """Coordinate descent (= HALS restricted to one pixel) on 1/2 x'Gx - q'x + lam_w'x, x >= lo, fixed sweeps."""
    n = x.shape[0]

    def coord(j, x):
        gjj = G[j, j]
        step = (G[j] @ x - q[j] + lam_w[j]) / jnp.where(gjj > 0, gjj, 1.0)
        xj = jnp.where(free[j] & (gjj > 0), jnp.maximum(lo[j], x[j] - step), lo[j])
        return x.at[j].set(xj)

    return lax.fori_loop(0, n_sweeps * n, lambda i, x: coord(i % n, x), x)


def _residual(x, G, q, rr):
    """||r - x F||^2 from the statistics: rr - 2 q'x + x'Gx."""
    return rr - 2.0 * (q @ x) + x @ (G @ x)


def _solve_forward(G, q, rr, budget, free, w, lo, x0, n_sweeps, n_lambda, constrained):
    """Forward solve of one pixel; returns (x, lam)."""
    x0 = jnp.where(free, jnp.maximum(x0, lo), lo)
    zero = jnp.zeros_like(q)
    x_ls = _cd(x0, G, q, zero, lo, free, 4 * n_sweeps)
    if not constrained:
        return x_ls, jnp.zeros((), q.dtype)
    # the sparsest point: all penalised weights at zero, the free (background) part refitted
    free_bg = free & (w == 0)
    x_bg = _cd(jnp.where(free_bg, x_ls, lo), G, q, zero, lo, free_bg, 4 * n_sweeps)
    lam_max = jnp.max(jnp.where(free & (w > 0), q - G @ x_bg, 0.0))
    lam_max = jnp.maximum(lam_max, 0.0)
    phi_lo = _residual(x_ls, G, q, rr) - budget
    phi_hi = _residual(x_bg, G, q, rr) - budget

    # Illinois regula falsi on phi(lam) = residual(x(lam)) - budget, increasing in lam, bracket [0, lam_max]
    def body(_, s):
        l_lo, p_lo, x_lo, l_hi, p_hi, x_hi, side = s
        denom = p_hi - p_lo
        lam = jnp.where(denom > 0, l_lo - p_lo * (l_hi - l_lo) / jnp.where(denom > 0, denom, 1.0), 0.5 * (l_lo + l_hi))
        lam = jnp.clip(lam, l_lo, l_hi)
        x = _cd(x_lo, G, q, lam * w, lo, free, n_sweeps)
        p = _residual(x, G, q, rr) - budget
        below = p <= 0
        # Illinois: halve the kept end's value when the same end is kept twice in a row
        p_hi = jnp.where(below & (side == 1), 0.5 * p_hi, p_hi)
        p_lo = jnp.where(~below & (side == -1), 0.5 * p_lo, p_lo)
        l_lo, p_lo, x_lo = jnp.where(below, lam, l_lo), jnp.where(below, p, p_lo), jnp.where(below, x, x_lo)
        l_hi, p_hi, x_hi = jnp.where(below, l_hi, lam), jnp.where(below, p_hi, p), jnp.where(below, x_hi, x)
        side = jnp.where(below, 1, -1).astype(jnp.int32)
        return l_lo, p_lo, x_lo, l_hi, p_hi, x_hi, side

    state = (jnp.zeros_like(lam_max), phi_lo, x_ls, lam_max, phi_hi, x_bg, jnp.zeros((), jnp.int32))
    l_lo, _, x_lo, _, _, _, _ = lax.fori_loop(0, n_lambda, body, state)
    # three cases: least squares already misses the budget (lam = 0, keep x_ls); the sparsest point meets it
    # (keep x_bg, no penalised weight is needed); otherwise the root found by the search
    x = jnp.where(phi_lo >= 0, x_ls, jnp.where(phi_hi <= 0, x_bg, x_lo))
    lam = jnp.where((phi_lo >= 0) | (phi_hi <= 0), 0.0, l_lo)
    return x, lam


@partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def solve_pixel(G, q, rr, budget, free, w, lo, x0, n_sweeps=10, n_lambda=20, constrained=True):
    """One pixel's noise-constrained non-negative lasso (MATH.md "Spatial update"), differentiable.

    Solves  minimise w'x  subject to  x >= lo,  rr - 2 q'x + x'Gx <= budget,  with the entries where `free` is False
    held at `lo`, through its Lagrangian form minimise 1/2 x'Gx - q'x + lam w'x: coordinate descent for a fixed lam
    (warm-started, `n_sweeps` sweeps), and a safeguarded regula-falsi (Illinois) search over lam in [0, lam_max] that
    meets the budget (`n_lambda` steps). If least squares (lam = 0) already leaves more than the budget, the
    least-squares point is returned; if the budget is met with every penalised weight at zero, that point is returned.
    With `constrained=False` it is plain non-negative least squares (the HALS relative), warm-started at x0.

    Gradients (custom VJP): implicit differentiation of the optimality conditions on the active set (entries above
    their bound), together with the budget equation when it binds; the bounds `lo`, the masks and x0 get no
    gradient.

    **Arguments:** `G` (n, n) Gram matrix of the traces; `q` (n,) traces times the pixel's data; `rr` the data's
    squared norm; `budget` the allowed residual energy (sn^2 T); `free` (n,) bool; `w` (n,) l1 weights (1 for a
    component, 0 for a background term); `lo` (n,) lower bounds; `x0` (n,) warm start; `n_sweeps`, `n_lambda` fixed
    iteration counts; `constrained` as above.

    **Returns:** x (n,).
    """
    x, _ = _solve_forward(G, q, rr, budget, free, w, lo, x0, n_sweeps, n_lambda, constrained)
    return x


def _solve_fwd(G, q, rr, budget, free, w, lo, x0, n_sweeps, n_lambda, constrained):
    x, lam = _solve_forward(G, q, rr, budget, free, w, lo, x0, n_sweeps, n_lambda, constrained)
    return x, (G, q, x, lam, free, w, lo, x0, rr, budget)


def _solve_bwd(n_sweeps, n_lambda, constrained, res, xbar):
    G, q, x, lam, free, w, lo, x0, rr, budget = res
    n = x.shape[0]
    act = free & (x > lo)
    bind = lam > 0
    safe_lam = jnp.where(bind, lam, 1.0)
    both = act[:, None] & act[None, :]
    J = jnp.where(both, G, jnp.eye(n, dtype=G.dtype))
    col = jnp.where(act & bind, w, 0.0)
    J = jnp.block([[J, col[:, None]], [col[None, :], jnp.where(bind, 0.0, 1.0)[None, None]]])
    rhs = jnp.concatenate([jnp.where(act, xbar, 0.0), jnp.zeros((1,), G.dtype)])
    u = jnp.linalg.solve(J, rhs)
    ux = jnp.where(act, u[:n], 0.0)
    ul = jnp.where(bind, u[n], 0.0)
    q_bar = ux - ul * x / safe_lam
    G_bar = -jnp.outer(ux, x) + (ul / (2.0 * safe_lam)) * jnp.outer(x, x)
    rr_bar = ul / (2.0 * safe_lam)
    budget_bar = -rr_bar
    zeros = jnp.zeros_like
    return G_bar, q_bar, rr_bar, budget_bar, None, zeros(w), zeros(lo), zeros(x0)


solve_pixel.defvjp(_solve_fwd, _solve_bwd)


@partial(jax.jit, static_argnames=("n_sweeps", "n_lambda", "constrained"))
def _solve_all(qs, G, rr, budget, idx, valid, A, b, *, n_sweeps, n_lambda, constrained):
    """Gather each pixel's small problem (its m candidate components + nb background terms), solve all with vmap.
    `qs` (d, m + nb): each pixel's entries of Q = R F' (`candidate_statistics`)."""
    d, m = idx.shape
    K = A.shape[1]
    nb = b.shape[1]
    full = jnp.concatenate([idx, jnp.broadcast_to(K + jnp.arange(nb), (d, nb))], axis=1)  # (d, n)
    Gs = G[full[:, :, None], full[:, None, :]]
    free = jnp.concatenate([valid, jnp.ones((d, nb), bool)], axis=1)
    w = jnp.concatenate([jnp.ones((m,), qs.dtype), jnp.zeros((nb,), qs.dtype)])
    lo = jnp.concatenate([jnp.zeros((d, m), qs.dtype), -b], axis=1)  # background solved as a shift from b
    x0 = jnp.concatenate([jnp.where(valid, jnp.take_along_axis(A, idx, axis=1), 0.0), jnp.zeros((d, nb), qs.dtype)], 1)
    solve = partial(solve_pixel, n_sweeps=n_sweeps, n_lambda=n_lambda, constrained=constrained)
    x = jax.vmap(solve, in_axes=(0, 0, 0, 0, 0, None, 0, 0))(Gs, qs, rr, budget, free, w, lo, x0)
    xa = jnp.where(valid, x[:, :m], 0.0)
    A_new = jnp.zeros((d, K), qs.dtype).at[jnp.arange(d)[:, None], idx].add(xa)
    b_new = b + x[:, m:]
    return A_new, b_new


def _candidates(search: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the indices of the components whose search area holds it (increasing), padded with 0 to a multiple
    of 4 columns; `valid` marks the real ones; `slots` gives each the pixel's position in its component's pixel list
    (as `temporal.column_pixels(search)` orders them: by pixel; 0 where not valid). From the search areas' list of
    (pixel, component) pairs: 0.12 -> 0.02 s for 159 components of 256x256 against an argsort of every pixel's (K,)
    row.

    **Returns:** `(idx, valid, slots)`, each (d, m).
    """
    d, K = search.shape
    pix, comp = np.divmod(np.flatnonzero(search), K)  # by pixel, then component (the 2-D np.nonzero is slower)
    counts = np.bincount(pix, minlength=d)
    m = int(counts.max(initial=0))
    m = max(4, 4 * (-(-m // 4)))
    slot = np.arange(pix.size) - np.repeat(np.cumsum(counts) - counts, counts)
    by_comp = np.argsort(comp, kind="stable")  # the pairs by component, then pixel: the lists' order
    per_comp = np.bincount(comp, minlength=K)
    position = np.empty(pix.size, np.int32)
    position[by_comp] = np.arange(pix.size) - np.repeat(np.cumsum(per_comp) - per_comp, per_comp)
    order = np.zeros((d, m), np.int32)
    valid = np.zeros((d, m), bool)
    slots = np.zeros((d, m), np.int32)
    order[pix, slot] = comp
    valid[pix, slot] = True
    slots[pix, slot] = position
    return order, valid, slots


# ------------------------------------------------------------------------------------------------------ the update


def update_spatial(
    Yr,
    A,
    C,
    b,
    f,
    sn,
    *,
    search=None,
    radius: float | None = None,
    shape: tuple[int, int] | None = None,
    n_iter: int = 5,
    n_lambda: int = 10,
    method: str = "constrained",
    compact: bool = True,
    block: int = 4096,
):
    """Spatial update: new footprints A and background b for fixed traces C, f (CaImAn's `update_spatial_components`).

    For every pixel i, with its candidate components k (those whose search area holds i) and all nb background terms:

    - `method="constrained"` (MATH.md "Spatial update"): minimise ||a_i||_1 over a_i >= 0, b_i >= 0 subject to
      ||y_i - a_i C - b_i f||^2 <= sn_i^2 T (the background terms are not penalised). If even the least-squares fit
      leaves more than sn_i^2 T, the non-negative least-squares fit is returned for that pixel.
    - `method="hals"`: the fast relative, non-negative least squares for the same variables by `n_iter` coordinate
      (HALS) sweeps started from the current A and b.

    Everything is computed from one pass over the movie and a gather of the search areas' rows (the entries of Y F'
    the pixels use, F F' and each pixel's energy, with F = [C; f]: `candidate_statistics`), so each pixel's problem is
    small (its candidates plus nb) and all pixels are solved at once (vmap). Differentiable: the
    gradient with respect to Yr, C, f and sn comes from implicit differentiation of each pixel's optimality conditions
    (see `solve_pixel`); search areas and the starting A, b are treated as constants.

    **Arguments:**

    - `Yr`: movie (d, T), d = H*W pixels in row-major order.
    - `A`: (d, K) current footprints (the warm start; with `search=None` they define the search areas).
    - `C`: (K, T) traces; `b`: (d, nb) background maps; `f`: (nb, T) background traces.
    - `sn`: (d,) noise sd of each pixel.
    - `search`: (d, K) bool, where each component may be non-zero; None -> `search_areas(A, shape, radius,
      compact=compact)` (then `radius` and `shape` are required).
    - `radius`: neuron radius in pixels (for the search areas); `shape`: (H, W).
    - `n_iter`: coordinate-descent sweeps per inner solve (HALS: the number of sweeps; constrained: sweeps per value of
      the multiplier, four times that for the first least-squares solve).
    - `n_lambda`: steps of the search on the multiplier (constrained only).
    - `method`: "constrained" or "hals".
    - `compact`: search-area shape when `search` is None (see `search_areas`).
    - `block`: pixels per chunk of the pass over the movie.

    **Returns:** `(A, b)`: A (d, K) >= 0, zero outside the search areas; b (d, nb) >= 0. Footprints are not
    normalised here (see `cleanup_footprints`).
    """
    if method not in ("constrained", "hals"):
        raise ParameterError(f"method={method!r}: choose 'constrained' or 'hals'.")
    Yr = jnp.asarray(Yr)
    if Yr.ndim != 2:
        raise ParameterError(f"Yr: expected a (pixels, frames) array, got shape {Yr.shape}.")
    d, T = Yr.shape
    dtype = Yr.dtype if jnp.issubdtype(Yr.dtype, jnp.floating) else jnp.float32
    Yr = Yr.astype(dtype)
    A = jnp.asarray(A, dtype)
    C = jnp.asarray(C, dtype)
    b = jnp.asarray(b, dtype)
    f = jnp.asarray(f, dtype)
    sn = jnp.asarray(sn, dtype).reshape(-1)
    K = A.shape[1] if A.ndim == 2 else -1
    if A.shape != (d, K) or C.shape != (K, T):
        raise ParameterError(f"A {A.shape} and C {C.shape} do not match Yr {Yr.shape}: need A (d, K) and C (K, T).")
    if b.ndim != 2 or b.shape[0] != d or f.shape != (b.shape[1], T):
        raise ParameterError(f"b {b.shape} and f {f.shape} do not match Yr {Yr.shape}: need b (d, nb), f (nb, T).")
    if sn.shape != (d,):
        raise ParameterError(f"sn: expected one noise level per pixel ({d},), got shape {sn.shape}.")
    if n_iter < 1 or n_lambda < 0:
        raise ParameterError(f"n_iter={n_iter!r} must be >= 1 and n_lambda={n_lambda!r} >= 0.")
    if search is None:
        if radius is None or shape is None:
            raise ParameterError("update_spatial: give either `search` (d, K) or both `radius` and `shape` (H, W).")
        search = search_areas(A, shape, radius, compact=compact)
    search = np.asarray(search, bool)
    if search.shape != (d, K):
        raise ParameterError(f"search: expected a bool array of shape ({d}, {K}), got {search.shape}.")
    idx, valid, slots = _candidates(search)
    qs, G, rr = candidate_statistics(Yr, C, b, f, search, idx, valid, slots, block=block)
    kw = dict(n_sweeps=int(n_iter), n_lambda=int(n_lambda), constrained=method == "constrained")
    some = valid.any(axis=1)
    if some.all():
        return _solve_all(qs, G, rr, sn * sn * T, jax.device_put(idx), jax.device_put(valid), A, b, **kw)
    # Pixels outside every search area have only the background terms left (no penalised weight, so their problem
    # is the nb-term non-negative least squares): solving them with m empty candidate slots cost as much as a real
    # pixel (57 % of the pixels of simulated 256x256 with 159 components, 0.6 of the 1.1 s per update). They are
    # solved as (d', nb) problems, the others as (d', m + nb); each set is padded to `pixel_bucket` rows (so that
    # similar fits share compiled shapes) and gathered, solved and written back in one compiled call (host arrays
    # go in by `device_put`: an eager conversion or slice is a program of its own to compile at a first fit).
    A_new, b_new = None, b
    for rows, m in ((np.flatnonzero(some), idx.shape[1]), (np.flatnonzero(~some), 0)):
        if rows.size == 0:
            continue
        n = rows.size
        rows = np.concatenate([rows, np.full(pixel_bucket(n) - n, d)])  # padding: an index past the last pixel
        pick = lambda x: np.concatenate([x[rows[:n], :m], np.zeros((rows.size - n, m), x.dtype)])  # noqa: E731
        sel = (jax.device_put(rows.astype(np.int32)), jax.device_put(pick(idx)), jax.device_put(pick(valid)))
        A_r, b_new = _solve_rows(qs, G, rr, sn, T, *sel, A, b_new, write_A=bool(m), **kw)
        if m:
            A_new = A_r
    return (jnp.zeros((d, K), dtype) if A_new is None else A_new), b_new


@partial(jax.jit, static_argnames=("write_A", "n_sweeps", "n_lambda", "constrained"))
def _solve_rows(qs, G, rr, sn, T, rows, idx, valid, A, b, *, write_A, n_sweeps, n_lambda, constrained):
    """`_solve_all` on the pixels `rows` (padded with the out-of-range index d: zero inputs, results dropped), with
    their m = idx.shape[1] candidates (the last m of qs's candidate columns) and the noise budgets sn^2 T, in one
    compiled call so that the gathered inputs and the scattered outputs need no extra whole-array copies.
    Returns the (d, K) footprints of these pixels (zero elsewhere; None unless `write_A`) and b with their rows
    replaced."""
    d, K = A.shape
    qs = qs[:, qs.shape[1] - idx.shape[1] - b.shape[1] :]
    budget = sn * sn * T
    get = lambda x: x.at[rows].get(mode="fill", fill_value=0)  # noqa: E731
    A_r, b_r = _solve_all(get(qs), G, get(rr), get(budget), idx, valid, get(A), get(b), n_sweeps=n_sweeps,
                          n_lambda=n_lambda, constrained=constrained)
    b = b.at[rows].set(b_r, mode="drop")
    return (jnp.zeros((d, K), A.dtype).at[rows].set(A_r, mode="drop") if write_A else None), b


def pixel_bucket(n: int) -> int:
    """Rows a set of `n` pixels is padded to in `update_spatial`: the smallest 8 ceil(32 2^(j/4)) >= n, j = 0, 1, ...
    (steps of at most 19 %, so a few compiled shapes serve fits whose search areas cover somewhat different numbers
    of pixels)."""
    size = lambda j: 8 * math.ceil(32 * 2 ** (j / 4))  # noqa: E731
    j = max(0, math.floor(4 * math.log2(max(n, 1) / 256)))
    while size(j) < n:
        j += 1
    return size(j)
