"""Temporal stage: colouring, raw traces from sufficient statistics vs the explicit residual, recovery of true traces
on true footprints, background-trace refit, gradients vs finite differences, compile-once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls
from scipy.signal import lfilter

from jaxcnmf.temporal import color_components, overlap_graph, raw_traces, to_csc, update_temporal


def tiny_movie(seed=0, H=32, W=32, T=600, p=2, noise=0.25, centers=None, sigma=2.0):
    """A small movie Y = A C + b f + noise with unit-norm Gaussian footprints and AR(p) calcium (local stand-in)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = [(7, 7), (7, 11), (8, 24), (22, 6), (24, 18), (23, 27)]  # the first two overlap
    yy, xx = np.mgrid[:H, :W]
    A = []
    for r, c in centers:
        a = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
        a = np.where(a > 0.05, a, 0.0).ravel()
        A.append(a / np.linalg.norm(a))
    A = np.stack(A, axis=1)
    K = A.shape[1]
    d_, r_ = np.exp(-1 / 20.0), np.exp(-1 / 2.0)
    g = np.array([d_ + r_, -d_ * r_]) if p == 2 else np.array([d_])
    S = (rng.random((K, T)) < 0.03) * rng.lognormal(0.0, 0.3, (K, T)) * 3.0
    C = lfilter([1.0], np.r_[1.0, -g], S, axis=1)
    b = (1.0 + 0.5 * np.sin(xx / 7.0) ** 2).ravel()[:, None]
    f = (1.0 + 0.1 * np.sin(np.arange(T) / 50.0))[None, :]
    Y = A @ C + b @ f + noise * rng.normal(size=(H * W, T))
    return dict(Y=Y, A=A, C=C, S=S, b=b, f=f, g=np.tile(g, (K, 1)), shape=(H, W))


def test_all_at_once_equals_disjoint_groups_without_overlaps_and_settles_with_them():
    """groups of all components at once (Jacobi, `fit`'s temporal_groups="all"): for footprints that do not overlap
    no raw trace depends on another component's trace, so its sweeps equal the coloured groups' (Gauss-Seidel) sweeps;
    with an overlapping pair both orders reach the same fixed point after a few sweeps."""
    # every call below has the same padded shapes and options: one compiled sweep serves them all
    kw = dict(p=1, update_f=False, threads=1, n_sweeps=8, lam=0.5)  # a fixed lam: one objective
    far = tiny_movie(seed=2, centers=[(6, 6), (6, 24), (24, 6), (24, 24)], p=1, T=400)
    Y = jnp.asarray(far["Y"], jnp.float32)
    C0 = np.zeros_like(far["C"])
    assert not overlap_graph(far["A"]).any()
    one = np.arange(4, dtype=np.int32)[None]
    seq = update_temporal(Y, far["A"], C0, far["b"], far["f"], g=far["g"], **kw)
    jac = update_temporal(Y, far["A"], C0, far["b"], far["f"], g=far["g"], groups=one, **kw)
    np.testing.assert_allclose(np.asarray(jac.C), np.asarray(seq.C), rtol=1e-5, atol=1e-5)
    m = tiny_movie(seed=2, p=1, T=400)  # the first two footprints overlap
    Y = jnp.asarray(m["Y"], jnp.float32)
    K = m["A"].shape[1]
    kw["g"] = m["g"]
    seq = update_temporal(Y, m["A"], m["C"], m["b"], m["f"], **kw)
    jac = update_temporal(Y, m["A"], m["C"], m["b"], m["f"], groups=np.arange(K, dtype=np.int32)[None], **kw)
    scale = float(np.abs(np.asarray(seq.C)).max())
    np.testing.assert_allclose(np.asarray(jac.C), np.asarray(seq.C), atol=2e-3 * scale)


def test_colouring_gives_disjoint_balanced_groups():
    rng = np.random.default_rng(0)
    d, K = 400, 40
    A = (rng.random((d, K)) < 0.03) * rng.random((d, K))
    groups = color_components(A)
    adj = overlap_graph(A)
    members = groups[groups < K]
    np.testing.assert_array_equal(np.sort(members), np.arange(K))  # each component exactly once
    for grp in groups:
        grp = grp[grp < K]
        assert not adj[np.ix_(grp, grp)].any()
    sizes = (groups < K).sum(axis=1)
    assert sizes.max() - sizes.min() <= max(2, sizes.max() // 2)
    assert color_components(np.zeros((10, 0))).shape == (0, 1)


def test_to_csc_and_overlap_graph_equal_dense_references():
    """to_csc (one flat scan of the non-zeros) gives scipy's own conversion, from numpy, jax and sparse input, values
    (negative ones too) or support; overlap_graph equals the dense A'A > 0 off the diagonal."""
    import scipy.sparse

    rng = np.random.default_rng(3)
    d, K = 300, 17
    A = ((rng.random((d, K)) < 0.05) * rng.normal(size=(d, K))).astype(np.float32)
    A[:, 4] = 0.0
    for src in (A, jnp.asarray(A), scipy.sparse.csr_matrix(A)):
        S = to_csc(src)
        assert scipy.sparse.isspmatrix_csc(S) and S.shape == (d, K) and S.dtype == np.float32
        np.testing.assert_array_equal(S.toarray(), A)
        np.testing.assert_array_equal(to_csc(src, np.float64).toarray(), A.astype(np.float64))
        B = to_csc(src, binary=True)
        assert B.dtype == np.float32
        np.testing.assert_array_equal(B.toarray(), (A > 0).astype(np.float32))
    P = np.abs(A)
    ref = (P.T @ P) > 0
    np.fill_diagonal(ref, False)
    np.testing.assert_array_equal(overlap_graph(P), ref)
    assert to_csc(np.zeros((5, 0), np.float32)).shape == (5, 0)


def test_raw_traces_equal_explicit_residual_projection():
    with jax.enable_x64(True):
        m = tiny_movie(T=100)
        Y, A, b, f = m["Y"], m["A"], m["b"], m["f"]
        C = np.abs(np.random.default_rng(1).normal(size=m["C"].shape))
        idx = jnp.arange(A.shape[1])
        got = raw_traces(idx, A.T @ Y, A.T @ A, A.T @ b, C, f)
        R = Y - A @ C - b @ f
        want = C + (A.T @ R) / (A**2).sum(axis=0)[:, None]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_one_group_matches_deconvolving_the_explicit_raw_traces():
    """Disjoint footprints, fixed g and sn: f is the exact NNLS background fit (scipy), and C is exactly the
    deconvolution of the explicitly formed raw traces C0 + a_k'(Y - A C0 - b f)/||a_k||^2."""
    from jaxcnmf.deconv import deconvolve

    with jax.enable_x64(True):
        m = tiny_movie(T=120, centers=[(6, 6), (6, 20), (22, 12)])
        Y, A, b, g = m["Y"], m["A"], m["b"], m["g"]
        C0 = 0.5 * m["C"]
        sn = np.full(A.shape[1], 0.25)
        res = update_temporal(Y, A, C0, b, np.zeros_like(m["f"]), g=g, sn_trace=sn, p=2)
        R = Y - A @ C0
        f_ref = np.array([nnls(b, R[:, t])[0] for t in range(R.shape[1])]).T
        np.testing.assert_allclose(np.asarray(res.f), f_ref, rtol=1e-9, atol=1e-9)
        raw = C0 + A.T @ (R - b @ f_ref) / (A**2).sum(axis=0)[:, None]
        ref = jax.vmap(lambda y, gg, s: deconvolve(y, gg, s, p=2, baseline=True))(raw, g, sn)  # the fit's setting
        np.testing.assert_allclose(np.asarray(res.C), np.asarray(ref.c), rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(np.asarray(res.S), np.asarray(ref.s), rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(np.asarray(res.baseline), np.asarray(ref.b), rtol=1e-7, atol=1e-7)
        # YrA is the raw trace at the final C minus C
        raw_final = A.T @ (Y - b @ f_ref) / (A**2).sum(axis=0)[:, None]  # disjoint: other components do not leak in
        np.testing.assert_allclose(np.asarray(res.YrA + res.C), raw_final, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("p", [1, 2])
def test_recovers_true_traces_on_true_footprints(p):
    m = tiny_movie(seed=p, p=p, T=800)
    res = update_temporal(jnp.asarray(m["Y"], jnp.float32), m["A"], np.zeros_like(m["C"]), m["b"], m["f"], p=p,
                          n_sweeps=2)
    C = np.asarray(res.C)
    assert C.dtype == np.float32 and np.isfinite(C).all()
    corr = [np.corrcoef(C[k], m["C"][k])[0, 1] for k in range(C.shape[0])]
    assert min(corr) > 0.95, corr
    assert res.g.shape == (C.shape[0], p)
    # the estimated kinetics are plausible (decay time within a factor 2: short noisy traces, see test_noise)
    from jaxcnmf.noise import ar_to_tau

    tau_d, _ = ar_to_tau(np.asarray(res.g, np.float64), 1.0)
    assert np.all((np.asarray(tau_d) > 10.0) & (np.asarray(tau_d) < 40.0)), tau_d
    # a second movie of the same shape (other data, other K) reuses the compiled update, both the single compiled
    # sweep (threads=1) and the threaded CPU driver's pieces
    from jaxcnmf import temporal

    m2 = tiny_movie(seed=5, p=p, T=800, centers=[(5, 5), (20, 20), (6, 26)])
    Y2 = jnp.asarray(m2["Y"], jnp.float32)
    Y1 = jnp.asarray(m["Y"], jnp.float32)
    update_temporal(Y1, m["A"], np.zeros_like(m["C"]), m["b"], m["f"], p=p, n_sweeps=2, threads=1)
    n = temporal._update_temporal_core._cached._cache_size()
    update_temporal(Y2, m2["A"], m2["C"], m2["b"], m2["f"], p=p, n_sweeps=2, threads=1)
    assert temporal._update_temporal_core._cached._cache_size() == n
    pieces = (temporal._start_jit, temporal._inputs_jit, temporal._apply_jit, temporal._f_step_jit,
              temporal._finish_jit, temporal._core_inputs, temporal._unpad_result)
    deconv = temporal._lane_deconv_jit(tuple(sorted(dict(lam=None, s_min=0.0, baseline=True, c1=True).items())))
    update_temporal(Y1, m["A"], np.zeros_like(m["C"]), m["b"], m["f"], p=p, n_sweeps=2, threads=2)
    sizes = [fn._cache_size() for fn in pieces + (deconv,)]
    assert min(sizes) >= 1
    update_temporal(Y2, m2["A"], m2["C"], m2["b"], m2["f"], p=p, n_sweeps=2, threads=2)
    assert [fn._cache_size() for fn in pieces + (deconv,)] == sizes


def test_gradient_wrt_movie_matches_finite_differences():
    with jax.enable_x64(True):
        m = tiny_movie(seed=3, H=16, W=16, T=120, centers=[(5, 5), (10, 11)], noise=0.2)  # same compiled shape as above
        A, b, f, g = m["A"], m["b"], m["f"], m["g"]
        sn = np.full(A.shape[1], 0.2)
        C0 = m["C"]
        w = np.random.default_rng(0).normal(size=m["C"].shape)

        def loss(Y):
            res = update_temporal(Y, A, C0, b, f, g=g, sn_trace=sn, p=2, groups=np.array([[0, 1]]))
            return jnp.sum(w * res.C) + 0.5 * jnp.sum(res.S**2)

        Y = jnp.asarray(m["Y"])
        grad = jax.grad(loss)(Y)
        assert np.isfinite(np.asarray(grad)).all()
        rng = np.random.default_rng(1)
        for _ in range(3):
            v = rng.normal(size=Y.shape)
            eps = 1e-6
            fd = (loss(Y + eps * v) - loss(Y - eps * v)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.sum(grad * v)), float(fd), rtol=1e-4, atol=1e-6)


def test_split_groups_give_the_same_update():
    """Groups larger than `max_group_frames` allows are deconvolved in parts: the same result (members of a group do
    not overlap, so they do not interact within a sweep)."""
    from jaxcnmf.temporal import split_groups

    m = tiny_movie(seed=3, p=1, T=400)
    K = m["A"].shape[1]
    groups = color_components(m["A"])
    split = split_groups(groups, K, 1)
    assert split.shape[1] == 1 and sorted(split[split < K].tolist()) == sorted(groups[groups < K].tolist())
    Y = jnp.asarray(m["Y"], jnp.float32)
    args = (Y, m["A"], m["C"] * 0.9, m["b"], m["f"])
    whole = update_temporal(*args, p=1, n_sweeps=2)
    parts = update_temporal(*args, p=1, n_sweeps=2, max_group_frames=400)  # one member per deconvolution
    for name in ("C", "S", "YrA", "g", "f", "lam"):
        np.testing.assert_allclose(np.asarray(getattr(parts, name)), np.asarray(getattr(whole, name)), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(np.asarray(getattr(whole, name))).max()), err_msg=name)


def test_footprint_products_equal_the_dense_product_and_compile_once_per_bucket():
    # A'Y from each footprint's pixels (local footprints): equal to the float64 dense product, differentiable with
    # respect to Y like it, one compiled program for footprints of similar sizes, and the dense fallback for a
    # footprint covering much of the field
    from jaxcnmf.temporal import _gather_products, footprint_products

    rng = np.random.default_rng(2)
    d, K, T = 40 * 40, 6, 50
    A = np.zeros((d, K), np.float32)
    for k in range(K):
        A[rng.choice(d, 20 + 7 * k, replace=False), k] = rng.random(20 + 7 * k)
    Y = rng.standard_normal((d, T)).astype(np.float32)
    ref = A.astype(np.float64).T @ Y.astype(np.float64)
    got = np.asarray(footprint_products(jnp.asarray(A), jnp.asarray(Y)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    n = _gather_products._cache_size()
    A2 = A.copy()
    A2[rng.choice(d, 5), 0] = 0.5  # a few more pixels: same padded size, no new compile
    footprint_products(jnp.asarray(A2), jnp.asarray(Y * 2))
    assert _gather_products._cache_size() == n
    loss = lambda fp: lambda Yj: jnp.sum(fp(jnp.asarray(A), Yj) ** 2)  # noqa: E731
    g_sparse = jax.grad(loss(footprint_products))(jnp.asarray(Y))
    g_dense = jax.grad(loss(lambda a, y: a.T @ y))(jnp.asarray(Y))
    np.testing.assert_allclose(np.asarray(g_sparse), np.asarray(g_dense), rtol=1e-4, atol=1e-4)
    A_wide = A.copy()
    A_wide[:, 1] = 1.0  # the whole field: the dense product
    np.testing.assert_allclose(np.asarray(footprint_products(jnp.asarray(A_wide), jnp.asarray(Y))),
                               A_wide.astype(np.float64).T @ Y, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [1, 2])
def test_threaded_cpu_driver_equals_the_compiled_sweep(p):
    """On the CPU, update_temporal splits each group's deconvolution over a thread pool (`threads`); the steps and
    their order are the core's, so every field must agree with `threads=1` (the single compiled sweep) to float32
    rounding, with two sweeps, f refitted, and g and sn estimated; a bad `threads` is a clear error."""
    from jaxcnmf.errors import ParameterError

    m = tiny_movie(p=p, T=600)
    Y, A, C, b, f = (np.asarray(m[k], np.float32) for k in ("Y", "A", "C", "b", "f"))
    C0 = np.maximum(C + 0.3 * np.random.default_rng(0).normal(size=C.shape), 0).astype(np.float32)
    one = update_temporal(Y, A, C0, b, f, p=p, n_sweeps=2, threads=1)
    for threads in (2, 3):  # 3 does not divide the padded group size: fewer, larger parts
        many = update_temporal(Y, A, C0, b, f, p=p, n_sweeps=2, threads=threads)
        for name in ("C", "S", "YrA", "g", "baseline", "c1", "lam", "f", "sn"):
            x, y = np.asarray(getattr(one, name)), np.asarray(getattr(many, name))
            assert np.abs(x - y).max() <= 5e-4 * max(np.abs(x).max(), 1e-6), (threads, name)
    with pytest.raises(ParameterError, match="threads"):
        update_temporal(Y, A, C0, b, f, p=p, threads=0)
