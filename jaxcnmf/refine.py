"""Whole-field refinement of a patch run, out of core: footprints kept sparse, the movie read band of rows by band,
chunk of frames by chunk, so memory is bounded by one band's statistics and the result, whatever the field or length.

Sits after `patches.stitch_patches` (see `patches.fit_patches`). Each stage is an exact rewrite of the in-memory stage
of `fit` it replaces (same problem, same solver): the spatial update is separable over pixels, so it runs band by
band on an exactly compressed movie of the band (`patches.compress_time`) with only the components whose search areas
reach the band; the temporal update sees the movie only through [A b]'Y, summed band by band
(`patches.compress_pixels`); quality's r-values are Pearson correlations, whose sums add up over bands.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

__all__ = ["refine", "band_rows", "sparse_search_areas", "cleanup_sparse", "spatial_banded", "project_banded",
           "quality_banded", "noise_banded"]

# pixels per band of rows: bounds the per-band statistics, (pixels, components in reach) float32 arrays
BAND_PIXELS = 65536


# ------------------------------------------------------------------------------------------------------------ bands


def band_rows(H: int, W: int, band_pixels: int | None = None) -> list[tuple[int, int]]:
    """Consecutive bands of whole rows `(r0, r1)` covering an `H x W` field, each of at most `band_pixels` pixels
    (at least one row).

    **Returns:** the list of `(r0, r1)`.
    """
    rows = max(1, min(H, int(band_pixels or BAND_PIXELS) // max(W, 1)))
    return [(r, min(r + rows, H)) for r in range(0, H, rows)]


def _columns_in(M_csr: sp.csr_matrix, p0: int, p1: int) -> np.ndarray:
    """Sorted indices of the columns of a sparse matrix with a stored entry in rows p0..p1."""
    return np.unique(M_csr.indices[M_csr.indptr[p0]:M_csr.indptr[p1]])


def _pad_cols(X: np.ndarray, n: int) -> np.ndarray:
    return X if X.shape[1] == n else np.pad(X, ((0, 0), (0, n - X.shape[1])))


def _pad_rows(X: np.ndarray, n: int, value=0) -> np.ndarray:
    if X.shape[0] == n:
        return X
    return np.pad(X, [(0, n - X.shape[0])] + [(0, 0)] * (X.ndim - 1), constant_values=value)


# ------------------------------------------------------------------------------------------- sparse footprint steps


def _crop(A: sp.csc_matrix, k: int, W: int, margin: int, H: int):
    """Column k as a dense crop around its support (plus `margin` pixels, clipped to the field)."""
    lo, hi = A.indptr[k], A.indptr[k + 1]
    idx, val = A.indices[lo:hi], A.data[lo:hi]
    rr, cc = np.divmod(idx, W)
    r0, c0 = max(int(rr.min()) - margin, 0), max(int(cc.min()) - margin, 0)
    r1, c1 = min(int(rr.max()) + margin + 1, H), min(int(cc.max()) + margin + 1, W)
    crop = np.zeros((r1 - r0, c1 - c0), np.float64)
    crop[rr - r0, cc - c0] = val
    return crop, (r0, c0)


def _from_crops(crops, shape: tuple[int, int], K: int, dtype=np.float32) -> sp.csc_matrix:
    """A `(d, K)` sparse matrix from per-column crops `[(k, crop, (r0, c0))]` (zeros are not stored)."""
    H, W = shape
    rows, cols, vals = [], [], []
    for k, crop, (r0, c0) in crops:
        rr, cc = np.nonzero(crop)
        rows.append((rr + r0) * W + cc + c0)
        cols.append(np.full(rr.size, k))
        vals.append(crop[rr, cc])
    if not rows:
        return sp.csc_matrix((H * W, K), dtype=dtype)
    return sp.csc_matrix((np.concatenate(vals).astype(dtype), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(H * W, K))


def sparse_search_areas(A, shape: tuple[int, int], radius: float, *, threshold: float = 0.1,
                        compact: bool = True) -> sp.csc_matrix:
    """`spatial.search_areas` for sparse footprints, component by component on a crop (same rule, same result).

    **Arguments:** `A` `(d, K)` footprints (sparse or dense); `shape` `(H, W)`; `radius`, `threshold`, `compact` as
    in `spatial.search_areas`.

    **Returns:** `(d, K)` sparse bool matrix (CSC).
    """
    from .spatial import _disk

    H, W = shape
    A = sp.csc_matrix(A)
    A.eliminate_zeros()
    if compact:
        element = _disk(radius) > 0.5
        n_apply = 1
    else:
        element = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
        n_apply = max(1, int(round(radius / 2)))
    margin = (element.shape[0] // 2) * n_apply + 1
    crops = []
    for k in range(A.shape[1]):
        if A.indptr[k + 1] == A.indptr[k]:
            continue
        crop, origin = _crop(A, k, W, margin, H)
        peak = crop.max()
        if not peak > 0:
            continue
        area = ndimage.binary_dilation(crop > threshold * peak, structure=element, iterations=n_apply)
        crops.append((k, area, origin))
    return _from_crops(crops, shape, A.shape[1], dtype=bool)


def cleanup_sparse(A, shape: tuple[int, int], *, connected: bool = True,
                   median: int = 1) -> tuple[sp.csc_matrix, np.ndarray]:
    """`spatial.cleanup_footprints` for sparse footprints, component by component on a crop of its support (widened
    by the median filter's reach, so the filter sees the same zeros as on the whole image).

    **Returns:** `(A_clean (d, K) CSC float32, norms (K,) float64)`, as `cleanup_footprints`.
    """
    from .spatial import cleanup_footprints

    H, W = shape
    A = sp.csc_matrix(A)
    A.eliminate_zeros()
    K = A.shape[1]
    norms = np.zeros(K)
    crops = []
    for k in range(K):
        if A.indptr[k + 1] == A.indptr[k]:
            continue
        crop, origin = _crop(A, k, W, int(median) // 2, H)
        a, n = cleanup_footprints(crop.reshape(-1, 1), crop.shape, connected=connected, median=median)
        norms[k] = float(np.asarray(n)[0])
        crops.append((k, np.asarray(a).reshape(crop.shape), origin))
    return _from_crops(crops, shape, K), norms


def _norms(A: sp.csc_matrix) -> np.ndarray:
    return np.sqrt(np.asarray(A.multiply(A).sum(axis=0), np.float64).ravel())


def _degenerate(A: sp.csc_matrix, C: np.ndarray) -> np.ndarray:
    """`merge.degenerate_components` from the footprints' norms (it depends on A only through them)."""
    from .merge import degenerate_components

    return degenerate_components(_norms(A)[None, :], C)


def merge_sparse(A: sp.csc_matrix, C: np.ndarray, groups) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """`merge.merge_components` with given groups on sparse footprints: each group's rank-1 NMF on the rows its
    members cover.

    **Returns:** `(A (d, K') CSC, C (K', T), source (K',) kept indices)`.
    """
    from .merge import rank1_nmf

    A = sp.csc_matrix(A, dtype=np.float32)
    C = np.array(C, np.float32)
    K = A.shape[1]
    drop = np.zeros(K, bool)
    A = A.tolil()
    for s in groups:
        sub = sp.csc_matrix(A[:, s])
        rows = np.unique(sub.nonzero()[0])
        a, c = rank1_nmf(sub[rows].toarray(), C[s], 30)
        col = np.zeros(A.shape[0], np.float32)
        col[rows] = np.asarray(a)
        A[:, s[0]] = col[:, None]
        C[s[0]] = np.asarray(c)
        drop[list(s[1:])] = True
    keep = np.flatnonzero(~drop)
    A = sp.csc_matrix(A)[:, keep]
    A.eliminate_zeros()
    return A, C[keep], keep


def merge_groups_sparse(A: sp.csc_matrix, C: np.ndarray, thr: float) -> list[list[int]]:
    """`merge.merge_groups` on sparse footprints."""
    from .merge import trace_correlation
    from .temporal import overlap_graph

    if A.shape[1] < 2:
        return []
    linked = overlap_graph(A) & (trace_correlation(C) > thr)
    n, labels = sp.csgraph.connected_components(sp.csr_matrix(linked), directed=False)
    sets = [sorted(np.flatnonzero(labels == i).tolist()) for i in range(n)]
    return sorted(s for s in sets if len(s) > 1)


# -------------------------------------------------------------------------------------------------- banded stages


def noise_banded(stream, *, chunk_frames: int, method: str = "logmexp", freq_range=(0.25, 0.5),
                 block: int = 1 << 22) -> np.ndarray:
    """`noise.estimate_noise_movie` by bands of rows (same windows, same statistic): `(H, W)` float32.

    A window holds `chunk_frames` frames of every pixel it covers (the spectrum needs them), so the bands are as
    high as `block` elements allow (16 MB of float32 by default), whatever the bands of the other passes.
    """
    import jax.numpy as jnp

    from .noise import _chunk_statistic, _finish_noise, _movie_chunks

    T, H, W = stream.T, stream.H, stream.W
    out = []
    L = min(int(chunk_frames), T)
    for r0, r1 in band_rows(H, W, max(W, block // L)):
        total = np.zeros((r1 - r0, W), np.float64)
        for start, stop, weight in _movie_chunks(T, L):
            chunk = stream.read(start, stop, r0, r1)
            total += weight * np.asarray(_chunk_statistic(jnp.asarray(chunk), tuple(freq_range), method), np.float64)
        out.append(total / (T / L))
    stat = np.concatenate(out)
    return np.asarray(_finish_noise(stat, method), np.float32)


def spatial_banded(stream, bands, A: sp.csc_matrix, C, b, f, sn, *, radius, shape, method, compact,
                   note=lambda s: None) -> tuple[sp.csc_matrix, np.ndarray]:
    """`spatial.update_spatial` on the whole field, band by band, from streamed statistics (exact).

    For each band: the components whose search area (or support) reaches it; one streamed pass over the band for
    the residual statistics; `compress_time` to an exactly equivalent short movie; `update_spatial` on it. The
    compressed movies are padded to a few fixed sizes (zero frames and pixels change nothing; the noise budget
    sn^2 T is kept) so bands share compiled shapes.

    **Returns:** `(A (d, K) CSC float32, b (d, nb) float32)`.
    """
    from .patches import compress_time
    from .spatial import update_spatial
    from .temporal import bucket

    H, W = shape
    d, K = A.shape
    T = C.shape[1]
    search = sparse_search_areas(A, shape, radius, compact=compact)
    reach = (search + (A != 0)).tocsr()
    A_csr, S_csr = A.tocsr(), search.tocsr()
    b_new = np.array(b, np.float32)
    rows, cols, vals = [], [], []
    band_px = max(r1 - r0 for r0, r1 in bands) * W
    for r0, r1 in bands:
        p0, p1 = r0 * W, r1 * W
        comps = _columns_in(reach, p0, p1)
        if comps.size == 0:
            comps = np.zeros(1, int)  # a component that cannot reach the band: the pixels keep only background
        A_b = A_csr[p0:p1][:, comps].toarray()
        Zq, zz = stream.residual_statistics(A_b, C[comps], b[p0:p1], f, rows=(r0, r1))
        Yc, Cc, fc, snc = compress_time(Zq, zz, A_b, C[comps], b[p0:p1], f, sn[p0:p1], T)
        n = bucket(Yc.shape[1])  # pad the compressed frames: zero frames leave q, G, ||r||^2 unchanged
        snc = np.asarray(sn[p0:p1], np.float64) * math.sqrt(T / n)
        m = band_px  # pad the pixels: an empty pixel with no candidate is solved to zero
        a_b, bb = update_spatial(
            _pad_rows(_pad_cols(Yc, n), m), _pad_rows(A_b, m), _pad_cols(Cc, n), _pad_rows(b[p0:p1], m),
            _pad_cols(fc, n), _pad_rows(snc.astype(Yc.dtype), m, 1.0),
            search=_pad_rows(S_csr[p0:p1][:, comps].toarray(), m), method=method)
        a_b = np.asarray(a_b)[: p1 - p0]
        b_new[p0:p1] = np.asarray(bb)[: p1 - p0]
        nz_r, nz_c = np.nonzero(a_b)
        rows.append(p0 + nz_r)
        cols.append(comps[nz_c])
        vals.append(a_b[nz_r, nz_c])
        note(f"  spatial band rows {r0}-{r1}: {comps.size} components in reach")
    A_new = sp.csc_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(d, K))
    A_new.eliminate_zeros()
    return A_new, b_new


def project_banded(stream, bands, A: sp.csc_matrix, b) -> np.ndarray:
    """[A b]'Y `(K + nb, T)`, summed band by band (each band with the components that have pixels in it)."""
    W = stream.W
    K, nb = A.shape[1], b.shape[1]
    A_csr = A.tocsr()
    MY = np.zeros((K + nb, stream.T), np.float64)
    for r0, r1 in bands:
        p0, p1 = r0 * W, r1 * W
        comps = _columns_in(A_csr, p0, p1)
        M = np.concatenate([A_csr[p0:p1][:, comps].toarray(), b[p0:p1]], axis=1)
        out = stream.project(M, rows=(r0, r1))
        MY[comps] += out[: comps.size]
        MY[K:] += out[comps.size:]
    return MY.astype(np.float32)


def temporal_banded(stream, bands, A: sp.csc_matrix, C, b, f, prm, g=None):
    """`temporal.update_temporal` on the whole field from [A b]'Y (one banded pass) and `compress_pixels` (exact)."""
    from .fit import temporal_groups
    from .patches import compress_pixels
    from .temporal import color_components, update_temporal

    MY = project_banded(stream, bands, A, b)
    Yp, Ap, bp = compress_pixels(MY, A, b)
    groups = temporal_groups(A, prm)
    return update_temporal(Yp, Ap, C, bp, f, g=g, p=prm.p, groups=color_components(A) if groups is None else groups,
                           n_sweeps=prm.temporal_sweeps, lam=prm.lam, s_min=prm.s_min)


def quality_banded(stream, bands, A: sp.csc_matrix, tr, b, f, sn, prm, shape):
    """`quality.evaluate_components` on the whole field, band by band (same snr, r-values, rule).

    The r-value of component k correlates a_k with its demixed mean image over its top frames on its neighbourhood;
    the mean image needs the movie only through Y W (W: the top-frame weights), streamed per band, and the
    correlation's sums (count, sums, squares, cross products over the neighbourhood) add up over bands.

    **Returns:** `(snr, r_value, accepted)`, numpy `(K,)` each.
    """
    import jax.numpy as jnp

    from .quality import _top_frame_weights, acceptance, trace_snr

    H, W = shape
    K, T = tr.C.shape
    C = np.asarray(tr.C, np.float32)
    n_top = int(min(max(1, int(np.clip(T // 20, 5, 50))), T))
    n_consecutive = 3 if prm.fps is None else max(3, int(round(0.1 * prm.fps)))
    Wt = np.asarray(_top_frame_weights(jnp.asarray(C), n_top))  # (T, K)
    CW = C.astype(np.float64) @ Wt
    fW = np.asarray(f, np.float64) @ Wt
    own = np.sum(C.T * Wt, axis=0, dtype=np.float64)
    nbhd = sparse_search_areas(A, shape, float(prm.neuron_radius), threshold=0.0).tocsr()
    A_csr = A.tocsr()
    sums = np.zeros((6, K))  # n, sum a, sum m, sum a^2, sum m^2, sum a m
    for r0, r1 in bands:
        p0, p1 = r0 * W, r1 * W
        comps = _columns_in(nbhd, p0, p1)
        if comps.size == 0:
            continue
        A_b = A_csr[p0:p1][:, comps].toarray().astype(np.float64)
        YW = stream.weighted(Wt[:, comps], rows=(r0, r1)).astype(np.float64)
        M = YW - np.asarray(b[p0:p1], np.float64) @ fW[:, comps] - A_b @ CW[np.ix_(comps, comps)] + A_b * own[comps]
        mask = nbhd[p0:p1][:, comps].toarray()
        Am, Mm = np.where(mask, A_b, 0.0), np.where(mask, M, 0.0)
        sums[:, comps] += np.stack([mask.sum(0), Am.sum(0), Mm.sum(0), (Am * Am).sum(0), (Mm * Mm).sum(0),
                                    (Am * Mm).sum(0)])
    n = np.maximum(sums[0], 1.0)
    num = sums[5] - sums[1] * sums[2] / n
    den = np.sqrt(np.maximum(sums[3] - sums[1] ** 2 / n, 0.0) * np.maximum(sums[4] - sums[2] ** 2 / n, 0.0))
    r = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    A2 = A.multiply(A)
    a2 = np.asarray(A2.sum(axis=0), np.float64).ravel()
    floor = np.sqrt(np.asarray(A2.T @ (np.asarray(sn, np.float64) ** 2))).ravel() / np.where(a2 > 0, a2, 1.0)
    snr = trace_snr(jnp.asarray(C + np.asarray(tr.YrA, np.float32)), jnp.asarray(floor, jnp.float32),
                    n_consecutive=n_consecutive)
    q = acceptance(snr, jnp.asarray(r, jnp.float32), jnp.asarray(a2 > 0) & (jnp.max(jnp.asarray(C), axis=1) > 0),
                   min_snr=prm.min_snr, rval_thr=prm.rval_thr)
    return np.asarray(q.snr), np.asarray(q.r_value), np.asarray(q.accepted)


# --------------------------------------------------------------------------------------------------------- refine


def _upsample(X: np.ndarray, k: int, T: int) -> np.ndarray:
    """Traces of a fit on k-frame bins back at the movie's rate (each bin's value repeated; the tail held)."""
    out = np.repeat(np.asarray(X, np.float32), k, axis=1)[:, :T]
    if out.shape[1] < T:
        out = np.concatenate([out, np.repeat(out[:, -1:], T - out.shape[1], axis=1)], axis=1)
    return out


def refine(source, start, prm, *, chunk_frames: int | None = None, memory_budget=None, devices=None,
           n_iter: int = 1, boxes=None, progress=None, band_pixels: int | None = None):
    """Whole-field refinement of a stitched start, out of core: `n_iter` times [spatial update (one banded pass) ->
    clean-up -> temporal update (one banded pass)], with merging between iterations, then quality per component.

    When the patch fits saw the movie in bins of `start.bin` frames (a long movie), the refinement first computes
    the noise per pixel at the movie's own rate (one pass) and the traces at full rate (a temporal update, one pass)
    before the loop. Footprints stay sparse throughout; the dense `(K, H, W)` footprints are made only for the result.

    **Arguments:**

    - `source`: the `MovieSource`; `start`: a `patches.Stitched`; `prm`: `fit.Params`.
    - `chunk_frames`: frames per chunk of a pass; `None` derives it from `memory_budget` (bytes or "2GB", default
      2 GiB) after reserving the result.
    - `devices`: JAX devices over which each chunk's pixels are sharded; `n_iter`: refinement iterations.
    - `boxes`: unused (kept for callers of the earlier windowed quality); `progress`: a `ProgressBar` for notes.
    - `band_pixels`: pixels per band (default `BAND_PIXELS`).

    **Returns:** the whole-field `Result` (same layout and ordering as `fit`'s).
    """
    from .fit import empty_result, footprint_median
    from .patches import _FIT_BASE, Streamer, chunk_frames_for_budget, parse_memory_budget, relieve_memory

    T, H, W = source.shape
    d = H * W
    note = progress.note if progress is not None else (lambda s: None)
    A = sp.csc_matrix(start.A, dtype=np.float32)
    A.eliminate_zeros()
    C, b, f = np.asarray(start.C, np.float32), np.asarray(start.b, np.float32), np.asarray(start.f, np.float32)
    K, nb = A.shape[1], b.shape[1]
    bands = band_rows(H, W, band_pixels)
    band_px = max(r1 - r0 for r0, r1 in bands) * W
    budget = parse_memory_budget(memory_budget)
    if chunk_frames is None:
        # the runtime and compiled programs, the dense result, ~8 (K, T) trace arrays, a band's statistics
        reserved = _FIT_BASE + 4 * (d * (K + nb) + 8 * K * T + 4 * band_px * (K // max(len(bands), 1) + 64))
        chunk_frames = chunk_frames_for_budget(budget, band_px, reserved, n_frames=T)
    stream = Streamer(source, chunk_frames, devices, band_pixels=band_px)
    k_bin = int(getattr(start, "bin", 1))
    sn_img = np.asarray(start.sn, np.float32)
    relieve_memory(budget)  # what the patch fits left behind
    if k_bin > 1:
        sn_img = noise_banded(stream, chunk_frames=prm.chunk_frames).reshape(H, W)
        note(f"refine: noise at the movie's rate (patch fits saw bins of {k_bin} frames)")
    sn = sn_img.reshape(d)
    compact = prm.init == "greedy"
    tr = None
    if k_bin > 1 and K:
        C, f = _upsample(C, k_bin, T), _upsample(f, k_bin, T)
        tr = temporal_banded(stream, bands, A, C, b, f, prm)
        C, f = np.asarray(tr.C), np.asarray(tr.f)
        note(f"refine: traces at the movie's rate, {K} components")
    for it in range(n_iter):
        if A.shape[1] == 0:
            break
        relieve_memory(budget)
        A, b = spatial_banded(stream, bands, A, C, b, f, sn, radius=float(prm.neuron_radius), shape=(H, W),
                              method=prm.spatial_method, compact=compact)
        A, norms = cleanup_sparse(A, (H, W), connected=compact, median=footprint_median(prm))
        C = C * norms[:, None].astype(np.float32)
        keep = np.flatnonzero(~_degenerate(A, C))
        A, C = A[:, keep], C[keep]
        note(f"refine {it + 1}/{n_iter}: spatial update, {A.shape[1]} components")
        if A.shape[1] == 0:
            break
        tr = temporal_banded(stream, bands, A, C, b, f, prm)
        C, f = np.asarray(tr.C), np.asarray(tr.f)
        keep = np.flatnonzero(~_degenerate(A, C))
        A, C = A[:, keep], C[keep]
        tr = tr.select(keep)
        note(f"refine {it + 1}/{n_iter}: temporal update, {A.shape[1]} components")
        if it < n_iter - 1 and prm.merge_thr < 1 and A.shape[1] > 1:
            groups = merge_groups_sparse(A, C, prm.merge_thr)
            if groups:
                A, C, _ = merge_sparse(A, C, groups)
    if A.shape[1] == 0 or tr is None:
        return empty_result((T, H, W), prm, sn=sn_img, b=b, f=f)
    q = quality_banded(stream, bands, A, tr, b, f, sn, prm, (H, W))
    note("refine: quality")
    relieve_memory(budget)  # room for the dense footprints of the result
    return _assemble(A, tr, b, f, sn_img, q, prm, (H, W))


def _assemble(A: sp.csc_matrix, tr, b, f, sn, q, prm, shape):
    """The `Result` in `fit`'s layout (accepted first, then by decreasing SNR); dense footprints made only here."""
    from ._version import __version__
    from .fit import center_of_mass
    from .result import Result

    H, W = shape
    snr, r_value, accepted = q
    order = np.lexsort((-np.nan_to_num(snr, nan=-np.inf), ~accepted))
    A = A[:, order].tocsc()
    dense = np.zeros((len(order), H * W), np.float32)
    for k in range(len(order)):
        lo, hi = A.indptr[k], A.indptr[k + 1]
        dense[k, A.indices[lo:hi]] = A.data[lo:hi]
    per = lambda x: np.asarray(x)[order]  # noqa: E731
    return Result(
        A=dense.reshape(-1, H, W), C=per(tr.C), S=per(tr.S), b=np.asarray(b).T.reshape(-1, H, W),
        f=np.asarray(f), sn=np.asarray(sn, np.float32), g=per(tr.g), YrA=per(tr.YrA), baseline=per(tr.baseline),
        c1=per(tr.c1), lam=per(tr.lam), snr=snr[order], r_value=r_value[order], accepted=accepted[order],
        centers=center_of_mass(A, (H, W)).astype(np.float32), params=prm.to_dict(), version=__version__,
    )
