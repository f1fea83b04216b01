"""The temporal stage: denoised calcium C, spikes S and kinetics g of every component, with the footprints A fixed.

It sits in the fit loop after the spatial and background updates (`fit.py` composes them): block-coordinate descent
over groups of spatially disjoint components, each group deconvolved at once by `deconv.deconvolve_rows` (the
per-trace `deconv.deconvolve` on every row, as one batched computation).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .background import hals_f_step
from .errors import ParameterError

_EPS = 1e-12


# most trace frames (group members x frames) deconvolved at once: the exact AR(2) solve keeps a few dozen arrays of
# the trace's length per member, ~1 GB for 100 members of 20,000 frames
MAX_GROUP_FRAMES = 1 << 20


class TemporalResult(eqx.Module):
    """What `update_temporal` returns; every per-component array has a leading `K` axis.

    **Fields:**

    - `C`: `(K, T)` denoised calcium (the deconvolved trace without its baseline and initial-decay term).
    - `S`: `(K, T)` spikes, `S = G C` (the AR innovation), non-negative.
    - `YrA`: `(K, T)` residual traces `a_k'(Y - A C - b f) / ||a_k||^2` at the final `C`; `C + YrA` is the raw trace.
    - `g`: `(K, p)` AR coefficients used (re-estimated from the raw traces when not given).
    - `baseline`, `c1`, `lam`: `(K,)` baseline, initial calcium value and sparsity weight of each deconvolution.
    - `sn`: `(K,)` noise standard deviation of each raw trace (estimated from it when not given).
    - `f`: `(nb, T)` background traces, re-fitted (non-negative least squares) before the components.
    """

    C: Float[Array, "K T"]
    S: Float[Array, "K T"]
    YrA: Float[Array, "K T"]
    g: Float[Array, "K p"]
    baseline: Float[Array, " K"]
    c1: Float[Array, " K"]
    lam: Float[Array, " K"]
    f: Float[Array, "nb T"]
    sn: Float[Array, " K"]

    def select(self, keep) -> "TemporalResult":
        """The components `keep` (an index array or a slice) of every per-component field; `f` (shared) is kept."""
        return TemporalResult(C=self.C[keep], S=self.S[keep], YrA=self.YrA[keep], g=self.g[keep],
                              baseline=self.baseline[keep], c1=self.c1[keep], lam=self.lam[keep], f=self.f,
                              sn=self.sn[keep])


def to_csc(A, dtype=None, *, binary: bool = False):
    """A `(d, K)` matrix (numpy or concrete jax array, or `scipy.sparse`) as a `scipy.sparse.csc_matrix` of `dtype`
    (None: A's own); `binary=True` gives its support, ones where `A > 0`.

    From a dense array by one scan of the flat array: scipy's own conversion scans it with the 2-D `np.nonzero`,
    which took 20 ms of the 28 for 256x256 pixels x 150 components, the flat scan 3 ms (a fit converts its
    footprints a dozen times, for the overlap graph, the merge and the duplicate checks).
    """
    import scipy.sparse

    if scipy.sparse.issparse(A):
        S = scipy.sparse.csc_matrix(A > 0 if binary else A)
        return S.astype(dtype or (np.float32 if binary else S.dtype))
    A = np.asarray(A)
    d, K = A.shape
    flat = A.reshape(-1)
    idx = np.flatnonzero(flat > 0 if binary else flat)
    vals = np.ones(idx.size, dtype or np.float32) if binary else flat[idx].astype(dtype or A.dtype)
    return scipy.sparse.csc_matrix((vals, (idx // K, idx % K)), shape=(d, K))


def overlap_graph(A: np.ndarray) -> np.ndarray:
    """Which pairs of components share at least one pixel: the graph `A'A > 0` (host-side, numpy).

    **Arguments:**

    - `A`: `(d, K)` footprints (numpy or jax array with concrete values, or a `scipy.sparse` matrix).

    **Returns:** `(K, K)` bool adjacency matrix with a False diagonal.
    """
    # footprints are local: the sparse product is ~100x cheaper than the dense (d, K) one (1.2 s for 164
    # components of 256x256 on a loaded 2-core box)
    support = to_csc(A, np.float32, binary=True)
    adj = (support.T @ support).toarray() > 0
    np.fill_diagonal(adj, False)
    return adj


def color_components(A: np.ndarray, *, adjacency: np.ndarray | None = None) -> np.ndarray:
    """Split the components into groups whose footprints do not overlap (a greedy, balanced graph colouring).

    A first greedy colouring (components by decreasing degree, each to the first colour without a neighbour) fixes
    the number of colours `G`; a second pass refills the colours with a size cap of `ceil(K / G)` (opening a new colour
    only when every allowed one is full or in conflict), so the groups have nearly equal sizes. Groups are padded
    to one fixed size with the index `K` (a dummy component), so one compiled deconvolution serves every group.
    Runs on the host (it branches on values); pass `groups` to `update_temporal` to reuse a colouring.

    **Arguments:**

    - `A`: `(d, K)` footprints; two components conflict when their supports share a pixel.
    - `adjacency`: optional `(K, K)` bool conflict graph to use instead of the one computed from `A`.

    **Returns:** `(G, M)` int32 array of component indices, each row one group of mutually disjoint components,
    padded with `K`; `(0, 1)` when `K == 0`.
    """
    adj = overlap_graph(A) if adjacency is None else np.asarray(adjacency, bool)
    K = adj.shape[0]
    if K == 0:
        return np.zeros((0, 1), np.int32)
    order = np.argsort(-adj.sum(axis=1), kind="stable")

    def greedy(cap):
        groups: list[list[int]] = []
        for k in order:
            for grp in groups:
                if len(grp) < cap and not adj[k, grp].any():
                    grp.append(int(k))
                    break
            else:
                groups.append([int(k)])
        return groups

    n_colors = len(greedy(K))
    groups = greedy(int(np.ceil(K / n_colors)))
    M = max(len(g) for g in groups)
    out = np.full((len(groups), M), K, np.int32)
    for i, grp in enumerate(groups):
        out[i, : len(grp)] = sorted(grp)
    return out


def raw_traces(idx: Array, AY: Array, AA: Array, Ab: Array, C: Array, f: Array) -> Array:
    """Raw traces `c_k + a_k'(Y - A C - b f) / ||a_k||^2` of the components `idx`, from sufficient statistics.

    **Arguments:**

    - `idx`: `(M,)` component indices.
    - `AY`: `(K, T)` = `A'Y`; `AA`: `(K, K)` = `A'A`; `Ab`: `(K, nb)` = `A'b`.
    - `C`: `(K, T)` current traces; `f`: `(nb, T)` background traces.

    **Returns:** `(M, T)` raw traces (a component with an all-zero footprint gets its current trace back).
    """
    diag = jnp.diagonal(AA)[idx]
    safe = jnp.where(diag > _EPS, diag, 1.0)
    resid = AY[idx] - AA[idx] @ C - Ab[idx] @ f
    return C[idx] + jnp.where(diag[:, None] > _EPS, resid / safe[:, None], 0.0)


def _pad_stats(AY, AA, Ab, C):
    """Append the dummy component `K` (zero footprint, zero trace, unit self-overlap) used to pad groups."""
    K, T = C.shape
    AYp = jnp.concatenate([AY, jnp.zeros((1, T), AY.dtype)])
    AAp = jnp.zeros((K + 1, K + 1), AA.dtype).at[:K, :K].set(AA).at[K, K].set(1.0)
    Abp = jnp.concatenate([Ab, jnp.zeros((1, Ab.shape[1]), Ab.dtype)])
    Cp = jnp.concatenate([C, jnp.zeros((1, T), C.dtype)])
    return AYp, AAp, Abp, Cp


def _initial_state(C, f, g_fixed, sn_fixed, p):
    """The block-coordinate descent's state: the traces (with the dummy component `K` appended) and per-component
    results, zero until a component's group is visited (given g and sn are filled in)."""
    K1, _ = C.shape  # C already holds the dummy row
    dtype = C.dtype
    zeros_k = jnp.zeros((K1,), dtype)
    return dict(
        C=C,
        S=jnp.zeros_like(C),
        g=jnp.zeros((K1, p), dtype) if g_fixed is None else jnp.concatenate([g_fixed, jnp.zeros((1, p), dtype)]),
        sn=zeros_k if sn_fixed is None else jnp.concatenate([sn_fixed, jnp.ones((1,), dtype)]),
        baseline=zeros_k,
        c1=zeros_k,
        lam=zeros_k,
        f=f,
    )


def _group_inputs(stats, state, idx, *, p, estimate_sn, estimate_g):
    """A group's raw traces and the noise and kinetics they are deconvolved with (estimated from them unless given)."""
    from .noise import estimate_ar, estimate_noise

    AYp, AAp, Abp = stats
    K = AYp.shape[0] - 1
    dtype = AYp.dtype
    raw = raw_traces(idx, AYp, AAp, Abp, state["C"], state["f"])
    sn = estimate_noise(raw) if estimate_sn else state["sn"][idx]
    sn = jnp.where(idx == K, 1.0, sn).astype(dtype)
    g = estimate_ar(raw, p, sn=sn) if estimate_g else state["g"][idx]
    return raw, g.astype(dtype), sn


def _group_apply(state, idx, g, sn, res):
    """The state after a group's deconvolution `res` (the dummy component's trace stays zero)."""
    K = state["C"].shape[0] - 1
    dtype = state["C"].dtype
    new = dict(state)
    for name, val in (("C", res.c), ("S", res.s), ("g", g), ("sn", sn), ("baseline", res.b), ("c1", res.c1),
                      ("lam", res.lam)):
        new[name] = state[name].at[idx].set(jnp.asarray(val, dtype))
    new["C"] = new["C"].at[K].set(0.0)
    return new


def _f_step(stats_b, state):
    bY, bA, bb = stats_b
    K = state["C"].shape[0] - 1
    new = dict(state)
    new["f"] = hals_f_step(bY, bA, state["C"][:K], bb, state["f"])
    return new


def _finish(AY, AA, Ab, state) -> TemporalResult:
    """The result from the final state: YrA at the final traces, the dummy component dropped."""
    K = AY.shape[0]
    Cf = state["C"]
    diag = jnp.diagonal(AA)
    safe = jnp.where(diag > _EPS, diag, 1.0)
    YrA = jnp.where(diag[:, None] > _EPS, (AY - AA @ Cf[:K] - Ab @ state["f"]) / safe[:, None], 0.0)
    return TemporalResult(
        C=Cf[:K], S=state["S"][:K], YrA=YrA, g=state["g"][:K], baseline=state["baseline"][:K],
        c1=state["c1"][:K], lam=state["lam"][:K], f=state["f"], sn=state["sn"][:K],
    )


def _lane_deconv(deconv_kw):
    """The group's deconvolution: `deconv.deconvolve` on every row, as one batched computation (`deconvolve_rows`)."""
    from .deconv import deconvolve_rows

    return functools.partial(deconvolve_rows, **deconv_kw)


@eqx.filter_jit
def _update_temporal_core(
    AY, AA, Ab, bY, bb, C, f, groups, g_fixed, sn_fixed, *, p, n_sweeps, update_f, deconv_kw
):
    AYp, AAp, Abp, Cp = _pad_stats(AY, AA, Ab, C)
    stats, stats_b = (AYp, AAp, Abp), (bY, Ab.T, bb)
    K = C.shape[0]
    deconv = _lane_deconv(deconv_kw)
    inputs = functools.partial(_group_inputs, p=p, estimate_sn=sn_fixed is None, estimate_g=g_fixed is None)

    def group_step(state, idx):
        raw, g, sn = inputs(stats, state, idx)
        return _group_apply(state, idx, g, sn, deconv(raw, g, sn)), None

    def maybe_group_step(state, idx):  # groups made only of padding are skipped (no deconvolution work)
        return jax.lax.cond(jnp.all(idx == K), lambda s, i: (s, None), group_step, state, idx)

    def sweep(state, _):
        if update_f:
            state = _f_step(stats_b, state)
        state, _ = jax.lax.scan(maybe_group_step, state, groups)
        return state, None

    state, _ = jax.lax.scan(sweep, _initial_state(Cp, f, g_fixed, sn_fixed, p), None, length=n_sweeps)
    return _finish(AY, AA, Ab, state)


# the threaded CPU driver's compiled pieces (one compiled program per shape, as the core's)
def _start(AY, AA, Ab, C, f, g_fixed, sn_fixed, p):
    AYp, AAp, Abp, Cp = _pad_stats(AY, AA, Ab, C)
    return (AYp, AAp, Abp), _initial_state(Cp, f, g_fixed, sn_fixed, p)


_start_jit = jax.jit(_start, static_argnums=(7,))
_finish_jit = jax.jit(_finish)


@functools.partial(jax.jit, static_argnames=("p", "estimate_sn", "estimate_g", "n_parts"))
def _inputs_jit(stats, state, idx, *, p, estimate_sn, estimate_g, n_parts):
    """`_group_inputs` split into `n_parts` equal sets of lanes (one per thread): `(g, sn)` of the whole group and
    the list of the parts' `(raw, g, sn)`. Splitting here, not by eager slices, keeps it one compiled program."""
    raw, g, sn = _group_inputs(stats, state, idx, p=p, estimate_sn=estimate_sn, estimate_g=estimate_g)
    w = idx.shape[0] // n_parts
    return (g, sn), [(raw[i * w : (i + 1) * w], g[i * w : (i + 1) * w], sn[i * w : (i + 1) * w])
                          for i in range(n_parts)]


@jax.jit
def _apply_jit(state, idx, g, sn, parts):
    """`_group_apply` with the parts' deconvolutions joined (in one compiled program)."""
    return _group_apply(state, idx, g, sn, jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts))


@jax.jit
def _f_step_jit(bY, Ab, bb, state):
    return _f_step((bY, Ab.T, bb), state)


@functools.lru_cache(maxsize=32)
def _lane_deconv_jit(deconv_items):
    return jax.jit(_lane_deconv(dict(deconv_items)))


def _update_temporal_threaded(
    AY, AA, Ab, bY, bb, C, f, groups, g_fixed, sn_fixed, *, p, n_sweeps, update_f, deconv_kw, threads
):
    """`_update_temporal_core` driven from the host, for the CPU backend: the same steps in the same order, but each
    group's deconvolution split into `threads` equal sets of lanes solved at once from a thread pool (XLA runs a
    batched deconvolution's sequential scans on one core; the lanes are independent). Concrete inputs only
    (not differentiable: `update_temporal` uses the core whenever it is traced)."""
    from ._threads import Pool

    K = C.shape[0]
    stats, state = _start_jit(AY, AA, Ab, C, f, g_fixed, sn_fixed, p)
    deconv = _lane_deconv_jit(tuple(sorted(deconv_kw.items())))
    groups = np.asarray(groups)
    M = groups.shape[1]
    n_parts = max(1, min(int(threads), M))
    while M % n_parts:
        n_parts -= 1
    with Pool(n_parts) as pool:
        for _ in range(n_sweeps):
            if update_f:
                state = _f_step_jit(bY, Ab, bb, state)
            for row in groups:
                if np.all(row == K):  # padding only
                    continue
                idx = jax.device_put(row)
                (g, sn), lanes = _inputs_jit(stats, state, idx, p=p, estimate_sn=sn_fixed is None,
                                                estimate_g=g_fixed is None, n_parts=n_parts)
                parts = list(pool.map(lambda part: deconv(*part), lanes))
                state = _apply_jit(state, idx, g, sn, parts)
    return _finish_jit(AY, AA, Ab, state)


def update_temporal(
    Yr: Float[Array, "d T"],
    A: Float[Array, "d K"],
    C: Float[Array, "K T"],
    b: Float[Array, "d nb"],
    f: Float[Array, "nb T"],
    *,
    g: Float[Array, "K p"] | None = None,
    sn_trace: Float[Array, " K"] | None = None,
    p: int = 2,
    groups: Int[np.ndarray, "G M"] | None = None,
    n_sweeps: int = 1,
    update_f: bool = True,
    lam: float | None = None,
    s_min: float = 0.0,
    baseline: bool | float = True,
    c1: bool | float = True,
    max_group_frames: int = MAX_GROUP_FRAMES,
    threads: int | None = None,
) -> TemporalResult:
    """Update the traces of all components with the footprints fixed (CaImAn's `update_temporal_components`).

    Block-coordinate descent: components are split into groups whose footprints do not overlap
    (`color_components`); within a group the raw traces `c_k + a_k'(Y - A C - b f)/||a_k||^2` are independent, so
    the whole group is deconvolved at once (noise-constrained, baseline and initial value estimated, by default),
    and `C` is updated group after group (Gauss-Seidel). The movie enters only through `A'Y` and `b'Y` (one pass);
    the rest works on `(K, T)` arrays. Before the components, each sweep refits the background traces `f >= 0`
    (non-negative least squares for `b` fixed, no sparsity). AR coefficients are re-estimated from each raw trace
    (`noise.estimate_ar`) unless `g` is given; likewise the trace noise (`noise.estimate_noise`) unless `sn_trace` is.
    Differentiable with respect to `Yr` (through the deconvolution's implicit VJP; pass `g` and `sn_trace` to keep
    the kinetics fixed). `groups` is computed on the host from `A`'s support unless given.

    **Arguments:**

    - `Yr`: `(d, T)` movie, pixels in row-major order.
    - `A`: `(d, K)` non-negative footprints; `C`: `(K, T)` current traces (the starting point).
    - `b`: `(d, nb)` background footprints; `f`: `(nb, T)` background traces.
    - `g`: optional `(K, p)` AR coefficients (CaImAn `p` gives the order); `None` re-estimates them per component.
    - `sn_trace`: optional `(K,)` noise sd of each raw trace; `None` estimates it (power spectral density).
    - `p`: AR order, 1 or 2.
    - `groups`: optional `(G, M)` colouring from `color_components` (padding index `K`).
    - `n_sweeps`: passes of block-coordinate descent over all groups (CaImAn's `ITER`).
    - `update_f`: refit the background traces before each sweep.
    - `lam`, `s_min`, `baseline`, `c1`: passed to `deconv.deconvolve` (`lam=None` is the noise-constrained form).
    - `max_group_frames`: most trace frames deconvolved at once (members x T); larger groups are split
      (`split_groups`), which bounds the deconvolution's working memory on long movies and changes nothing else:
      members of a group do not overlap, so their updates do not depend on each other.
    - `threads`: on the CPU backend with concrete (not traced) inputs, each group's deconvolution is split into this
      many equal sets of members solved at once from a thread pool (`_update_temporal_threaded`: XLA solves a
      vmapped deconvolution on one core). None: one per core this process may use; 1: the single compiled sweep
      (`_update_temporal_core`, also what runs under `jit`/`grad` and on GPU/TPU). The results agree to float32
      rounding (the same steps in the same order).

    **Returns:** a `TemporalResult` (`C`, `S`, `YrA`, `g`, `baseline`, `c1`, `lam`, `f`, `sn`).
    """
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ParameterError(f"threads={threads!r}: expected a positive integer or None.")
    K = A.shape[1]
    dtype = jnp.result_type(Yr)
    groups = np.asarray(color_components(A) if groups is None else groups, np.int32)
    groups = split_groups(groups, K, max(1, int(max_group_frames) // max(int(Yr.shape[1]), 1)))
    Kp = bucket(K)  # pad K and the groups to a few fixed sizes so that a fit whose K changes rarely recompiles
    groups = pad_groups(groups, K, Kp)
    A = jnp.asarray(A, dtype)
    b = jnp.asarray(b, dtype)
    Yr = jnp.asarray(Yr, dtype)
    AY = footprint_products(A, Yr)
    deconv_kw = dict(lam=lam, s_min=s_min, baseline=baseline, c1=c1)
    traced = any(isinstance(x, jax.core.Tracer) for x in (Yr, A, C, b, f))
    if threads is None:
        from ._threads import host_threads

        threads = host_threads()
    stats = _core_inputs(AY, A, b, Yr, jnp.asarray(C, dtype), jnp.asarray(f, dtype),
                         None if g is None else jnp.asarray(g, dtype),
                         None if sn_trace is None else jnp.asarray(sn_trace, dtype), Kp=Kp)
    args = (*stats[:7], jax.device_put(groups), *stats[7:])  # AY, AA, Ab, bY, bb, C, f, groups, g, sn
    kw = dict(p=p, n_sweeps=n_sweeps, update_f=update_f, deconv_kw=deconv_kw)
    if threads > 1 and not traced and jax.default_backend() == "cpu":
        res = _update_temporal_threaded(*args, **kw, threads=int(threads))
    else:
        res = _update_temporal_core(*args, **kw)
    return _unpad_result(res, K)


@functools.partial(jax.jit, static_argnames=("Kp",))
def _core_inputs(AY, A, b, Yr, C, f, g, sn, *, Kp):
    """The temporal core's inputs, padded from K to Kp components, in one compiled program (no eager op per array:
    each would be a program of its own to compile or load at a fit's first call): `(AY, A'A, A'b, b'Y, b'b, C, f,
    g, sn)`, g and sn None when not given. b'Y is one pass over the movie."""
    K = A.shape[1]
    pad = lambda x: None if x is None else jnp.pad(x, [(0, Kp - K)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    AA = jnp.pad(A.T @ A, [(0, Kp - K), (0, Kp - K)])
    return pad(AY), AA, pad(A.T @ b), b.T @ Yr, b.T @ b, pad(C), f, pad(g), pad(sn)


@functools.partial(jax.jit, static_argnums=(1,))
def _unpad_result(res, K: int) -> TemporalResult:
    """The first K components of a padded `TemporalResult` (f is shared), in one compiled program."""
    return res.select(slice(None, K))


def footprint_products(A: Float[Array, "d K"], Yr: Float[Array, "d T"]) -> Float[Array, "K T"]:
    """`A' Yr`, from each footprint's non-zero pixels when the footprints are local.

    A footprint covers a few hundred of the field's pixels, so gathering its rows of `Yr` and summing them is
    ~10x less work than the dense product (0.2 vs 2.4 s for 164 footprints on 256x256x3000, 2 loaded cores). The
    pixels come from `A`'s concrete values (padded to a few fixed counts, one compiled shape for similar
    problems); the product is differentiable with respect to `Yr`. Falls back to the dense product when `A` is
    traced (under `jit`/`grad` with respect to it) or not sparse (more than 1/8 of the pixels in some column).

    **Arguments:** `A` (d, K) footprints; `Yr` (d, T) movie.

    **Returns:** (K, T) `A' Yr` in `Yr`'s dtype (the sum's order differs from the dense product's: equal to
    float32 rounding).
    """
    d, K = A.shape
    if isinstance(A, jax.core.Tracer) or K == 0:
        return A.T @ Yr
    host = np.asarray(A)
    idx, valid = column_pixels(host != 0)
    if idx.shape[1] > d // 8:
        return jnp.asarray(A).T @ Yr
    vals = np.where(valid, np.take_along_axis(host.T, idx, axis=1), 0)  # padding: pixel 0 with weight 0
    return _gather_products(jax.device_put(idx), jax.device_put(vals.astype(np.dtype(Yr.dtype))), Yr)


def column_pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of each column of a (d, K) bool `mask`, as (K, P) padded lists: `idx` (int32, padding pixel 0) and
    `valid` (bool), P = `bucket` of the largest column count (so similar problems share compiled shapes)."""
    mask = np.asarray(mask, bool)
    K = mask.shape[1]
    counts = mask.sum(axis=0)
    P = bucket(int(counts.max(initial=1)))
    idx = np.zeros((K, P), np.int32)
    valid = np.zeros((K, P), bool)
    # by component, then pixel: the flat scan of the (d, K) layout (by pixel, then component) and a stable sort by
    # component (the 2-D `np.nonzero(mask.T)` took 41 ms for 256x256 x 150, this 8 ms)
    rows, comp = np.divmod(np.flatnonzero(mask), K)
    order = np.argsort(comp, kind="stable")
    comp, rows = comp[order], rows[order]
    slot = np.arange(comp.size) - np.repeat(np.cumsum(counts) - counts, counts)
    idx[comp, slot] = rows
    valid[comp, slot] = True
    return idx, valid


@jax.jit
def _gather_products(idx, vals, Yr):
    """Row k: sum_p vals[k, p] Yr[idx[k, p]], one footprint at a time (a (P, T) gather each)."""
    return jax.lax.map(lambda iv: iv[1] @ Yr[iv[0]], (idx, vals))


_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def bucket(n: int) -> int:
    """The padded size used for `n` components or group members: the next of 8, 16, 24, 32, 48, 64, 96, ... (x1.5).

    **Arguments:**

    - `n`: a size.

    **Returns:** the smallest bucket `>= n` (beyond the table, `n` rounded up to a multiple of 1024).
    """
    for size in _BUCKETS:
        if n <= size:
            return size
    return -(-n // 1024) * 1024


def split_groups(groups: np.ndarray, K: int, max_members: int) -> np.ndarray:
    """Split each group of a colouring into groups of at most `max_members` (a group's members do not overlap, so
    any subset of it is a valid group too).

    **Arguments:** `groups` `(G, M)` padded with `K`; `K` the number of components; `max_members` (>= 1).

    **Returns:** `(G', M')` int32 padded with `K` (`groups` itself when no group is larger).
    """
    groups = np.asarray(groups, np.int32)
    if groups.shape[1] <= max_members:
        return groups
    rows = []
    for row in groups:
        members = row[row < K]
        rows += [members[i:i + max_members] for i in range(0, len(members), max_members)] or [members]
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), K, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def pad_groups(groups: np.ndarray, K: int, Kp: int) -> np.ndarray:
    """Re-pad a colouring for `Kp` components: padding index `K` becomes `Kp`, rows padded to `bucket(M)` columns and
    the number of groups to `bucket(G)` (all-padding groups cost nothing), so similar problems share one compiled
    shape.

    **Arguments:**

    - `groups`: `(G, M)` colouring padded with `K`; `K`: true number of components; `Kp`: padded number.

    **Returns:** `(G', M')` int32 array padded with `Kp`.
    """
    G, M = groups.shape
    out = np.full((bucket(G), bucket(M)), Kp, np.int32)
    out[:G, :M] = np.where(groups >= K, Kp, groups)
    return out
