"""Merging of components that are one neuron split in two, and removal of empty or degenerate components.

It sits in the fit loop after the temporal update (`fit.py` composes the stages); a merged component is refitted as
the rank-1 non-negative factorisation of its parts' joint contribution and re-deconvolved by the next temporal update.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from jaxtyping import Array, Float

from .temporal import overlap_graph, to_csc

_EPS = 1e-12


class MergeResult(eqx.Module):
    """What `merge_components` returns.

    **Fields:**

    - `A`: `(d, K')` footprints after merging (unit l2 norm for merged ones; the others unchanged).
    - `C`: `(K', T)` traces after merging.
    - `source`: `(K',)` int, for each output component the index of the input component it replaces (the first
      member of its merged set); use it to carry per-component fields (g, S, ...) over.
    - `merged`: `(K',)` bool, whether each output component is a merge of several inputs (its trace needs a new
      deconvolution).
    - `groups`: tuple of tuples of input indices that were merged (static, for reporting).
    """

    A: Float[Array, "d K"]
    C: Float[Array, "K T"]
    source: np.ndarray
    merged: np.ndarray
    groups: tuple = eqx.field(static=True, default=())


def trace_correlation(C: np.ndarray) -> np.ndarray:
    """Pearson correlation between the rows of `C`; rows with zero variance correlate 0 with everything.

    **Arguments:**

    - `C`: `(K, T)` traces.

    **Returns:** `(K, K)` correlation matrix (numpy, float64).
    """
    C = np.asarray(C, np.float64)
    Cc = C - C.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(Cc, axis=1)
    ok = norms > _EPS * max(1.0, float(np.abs(C).max(initial=0.0)))
    Cn = np.where(ok[:, None], Cc / np.where(ok, norms, 1.0)[:, None], 0.0)
    return Cn @ Cn.T


def merge_groups(A: np.ndarray, C: np.ndarray, *, thr: float = 0.85) -> list[list[int]]:
    """Sets of components to merge: connected parts of the graph "footprints overlap AND traces correlate > thr".

    **Arguments:**

    - `A`: `(d, K)` footprints; `C`: `(K, T)` traces (host arrays).
    - `thr`: correlation threshold (CaImAn's `merge_thr`).

    **Returns:** list of sorted index lists, each with at least two members.
    """
    A = np.asarray(A)
    K = A.shape[1]
    if K < 2:
        return []
    linked = overlap_graph(A) & (trace_correlation(C) > thr)
    n, labels = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_matrix(linked), directed=False)
    sets = [sorted(np.flatnonzero(labels == i).tolist()) for i in range(n)]
    return sorted([s for s in sets if len(s) > 1])


@functools.partial(jax.jit, static_argnames="n_iter")
def rank1_nmf(A_S: Array, C_S: Array, n_iter: int = 30) -> tuple[Array, Array]:
    """Best rank-1 non-negative approximation `a c` of `A_S C_S` (alternating non-negative least squares).

    Works on the factors only: `c <- max(0, (a' A_S) C_S / a'a)`, `a <- max(0, A_S (C_S c') / c c')`, so the
    `(d, T)` product is never formed. Starts from `a` = the footprints weighted by their traces' norms.

    **Arguments:**

    - `A_S`: `(d, m)` footprints of the set; `C_S`: `(m, T)` their traces.
    - `n_iter`: number of alternating steps.

    **Returns:** `(a (d,), c (T,))` with `||a|| = 1` (or all zero when the product is zero).
    """
    a = A_S @ jnp.linalg.norm(C_S, axis=1)
    a = a / jnp.maximum(jnp.linalg.norm(a), _EPS)

    def step(_, ac):
        a, _ = ac
        c = jnp.maximum((a @ A_S) @ C_S / jnp.maximum(a @ a, _EPS), 0.0)
        a = jnp.maximum(A_S @ (C_S @ c) / jnp.maximum(c @ c, _EPS), 0.0)
        return a, c

    a, c = jax.lax.fori_loop(0, n_iter, step, (a, jnp.zeros(C_S.shape[1], A_S.dtype)))
    c = jnp.maximum((a @ A_S) @ C_S / jnp.maximum(a @ a, _EPS), 0.0)  # c optimal for the final a
    norm = jnp.linalg.norm(a)
    return a / jnp.maximum(norm, _EPS), c * norm


def merge_components(
    A: Float[Array, "d K"],
    C: Float[Array, "K T"],
    *,
    thr: float = 0.85,
    n_iter: int = 30,
    groups: list[list[int]] | None = None,
) -> MergeResult:
    """Merge components whose footprints overlap and whose traces correlate above `thr` (CaImAn's `merge_thr`).

    Each connected set of such components (`merge_groups`) is replaced by the rank-1 non-negative factorisation of
    its joint contribution `sum_k a_k c_k` (`rank1_nmf`), placed at the position of its first member; the other
    members are dropped. The merged traces are not deconvolved here: the next `update_temporal` does it (see
    `MergeResult.merged`). Runs the grouping on the host (a graph's connected components).

    **Arguments:**

    - `A`: `(d, K)` non-negative footprints; `C`: `(K, T)` traces.
    - `thr`: correlation above which overlapping components are merged.
    - `n_iter`: alternating steps of the rank-1 factorisation.
    - `groups`: optional precomputed merge sets (skips `merge_groups`).

    **Returns:** a `MergeResult` (`A`, `C`, `source`, `merged`, `groups`); with nothing to merge, `A` and `C` are
    returned unchanged.
    """
    K = A.shape[1]
    if groups is None:
        groups = merge_groups(np.asarray(A), np.asarray(C), thr=thr)
    if not groups:
        return MergeResult(A=A, C=C, source=np.arange(K), merged=np.zeros(K, bool), groups=())
    A = jnp.asarray(A)
    C = jnp.asarray(C)
    drop = np.zeros(K, bool)
    merged = np.zeros(K, bool)
    for s in groups:
        idx = jnp.asarray(s)
        a, c = rank1_nmf(A[:, idx], C[idx], n_iter)
        A = A.at[:, s[0]].set(a)
        C = C.at[s[0]].set(c)
        drop[s[1:]] = True
        merged[s[0]] = True
    keep = np.flatnonzero(~drop)
    return MergeResult(A=A[:, keep], C=C[keep], source=keep, merged=merged[keep],
                       groups=tuple(tuple(s) for s in groups))


def degenerate_components(A: Float[Array, "d K"], C: Float[Array, "K T"], *, rel_tol: float = 1e-6) -> np.ndarray:
    """Which components are empty or broken: a zero (or tiny) footprint or trace, or any non-finite value.

    A footprint or trace counts as zero when its norm times the other's is below `rel_tol` times the largest such
    product over components (scale-free, so it works for any movie units).

    **Arguments:**

    - `A`: `(d, K)` footprints; `C`: `(K, T)` traces.
    - `rel_tol`: relative size below which a component's contribution `||a_k|| ||c_k||` counts as zero.

    **Returns:** `(K,)` bool numpy array, True for components to remove.
    """
    A = np.asarray(A)
    C = np.asarray(C)
    # the squared norms in float64 (no overflow from float32 values), without whole-array temporaries: a non-finite
    # value makes its column's sum non-finite, and only then is the column looked at element by element
    # (0.1 -> 0.03 s for 159 components of 256x256 inside a fit)
    sq_a = np.einsum("ij,ij->j", A, A, dtype=np.float64)
    sq_c = np.einsum("ij,ij->i", C, C, dtype=np.float64)
    bad_a, bad_c = np.flatnonzero(~np.isfinite(sq_a)), np.flatnonzero(~np.isfinite(sq_c))
    finite = np.ones(A.shape[1], bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in bad_a:
            col = A[:, k]
            finite[k] &= bool(np.isfinite(col).all())
            sq_a[k] = np.sum(np.square(np.where(np.isfinite(col), col, 0), dtype=np.float64))
        for k in bad_c:
            row = C[k]
            finite[k] &= bool(np.isfinite(row).all())
            sq_c[k] = np.sum(np.square(np.where(np.isfinite(row), row, 0), dtype=np.float64))
        size = np.sqrt(sq_a) * np.sqrt(sq_c)
    top = size.max(initial=0.0)
    return ~finite | (size <= rel_tol * top) | (size <= 0)


def explained_fraction(c: np.ndarray, others: np.ndarray) -> float:
    """How much of a trace's variance a non-negative combination of other traces explains: `1 - ||c - w'X||^2 /
    ||c - mean c||^2` with `w >= 0` the exact non-negative least-squares weights (scipy `nnls`).

    **Arguments:**

    - `c`: `(T,)` trace; `others`: `(n, T)` traces (n may be 0).

    **Returns:** the fraction (<= 1; 0 when `others` is empty or `c` is constant).
    """
    from scipy.optimize import nnls

    c = np.asarray(c, np.float64)
    tot = float(((c - c.mean()) ** 2).sum())
    if others.shape[0] == 0 or tot <= 0:
        return 0.0
    w, _ = nnls(np.asarray(others, np.float64).T, c)
    r = c - w @ others
    return 1.0 - float((r**2).sum()) / tot


def mixture_components(A: Float[Array, "d K"], C: Float[Array, "K T"], *, thr: float = 0.8) -> np.ndarray:
    """Which components are mixtures of their neighbours: a trace explained (`explained_fraction > thr`) by a
    non-negative combination of the traces of the components whose footprints overlap it.

    Such a component (typically a start placed between two overlapping neurons) carries no activity of its own.
    Components are visited from the weakest (smallest `||a_k|| ||c_k||`) up, and one found to be a mixture is removed
    before the next is tested, so of two components explaining each other only the weaker goes. Host-side (numpy).

    **Arguments:**

    - `A`: `(d, K)` footprints; `C`: `(K, T)` traces.
    - `thr`: explained-variance fraction above which a component counts as a mixture (1 disables the test).

    **Returns:** `(K,)` bool numpy array, True for mixtures.
    """
    A = np.asarray(A)
    C = np.asarray(C, np.float64)
    K = A.shape[1]
    out = np.zeros(K, bool)
    if K < 2 or thr >= 1:
        return out
    overlap = overlap_graph(A)
    size = np.linalg.norm(A, axis=0) * np.linalg.norm(C, axis=1)
    for k in np.argsort(size, kind="stable"):
        nbrs = np.flatnonzero(overlap[k] & ~out)
        if nbrs.size and explained_fraction(C[k], C[nbrs]) > thr:
            out[k] = True
    return out


DUPLICATE_COS = 0.95
"""Footprint cosine similarity at or above which two components are one footprint fitted twice
(`duplicate_components`)."""


def duplicate_components(A: Float[Array, "d K"], C: Float[Array, "K T"], *, thr: float = DUPLICATE_COS) -> np.ndarray:
    """Which components repeat another one's footprint: cosine similarity of the footprints >= `thr`.

    Two components with one footprint are one cell fitted twice: the model A C sees only the sum of their traces,
    so how the activity is split between them (and the correlation of the two parts, which `merge_components`
    looks at) is arbitrary. Of each such pair the weaker (smaller `||a_k|| ||c_k||`) is marked, strongest pairs
    first, a marked component pairing no further; the caller drops them and refits the traces of the rest (the
    kept twin then takes the whole activity). Overlapping neurons share part of a footprint, not all of it: the
    most overlapping true pairs of the simulator's movies (`overlap` 0.3 and 0.6) have cosines of 0.67-0.69.
    Host-side (numpy).

    **Arguments:**

    - `A`: `(d, K)` footprints; `C`: `(K, T)` traces.
    - `thr`: cosine similarity in (0, 1] at or above which a pair counts as a duplicate.

    **Returns:** `(K,)` bool numpy array, True for the weaker member of each duplicate pair.
    """
    C = np.asarray(C, np.float64)
    K = C.shape[0]
    out = np.zeros(K, bool)
    if K < 2:
        return out
    S = to_csc(A, np.float64)
    gram = (S.T @ S).toarray()  # footprints are local: the sparse product, not the dense (d, K) one
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    i, j = np.nonzero(np.triu(gram > 0, 1))
    if i.size == 0:
        return out
    cos = gram[i, j] / np.maximum(norms[i] * norms[j], _EPS)
    size = norms * np.linalg.norm(C, axis=1)
    for n in np.argsort(-cos, kind="stable"):
        if cos[n] < thr:
            break
        a, b = i[n], j[n]
        if out[a] or out[b]:
            continue
        out[a if (size[a], -a) < (size[b], -b) else b] = True
    return out
