"""Tests of jaxcnmf.deconv: exactness against float64 references and duality certificates, OASIS agreement, s_min,
compile-once, degenerate traces, float32 vs float64, and gradients vs finite differences."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _reference as R
from jaxcnmf import deconv
from jaxcnmf.deconv import DeconvResult, deconvolve, deconvolve_batch
from jaxcnmf.errors import ParameterError, TraceError
from jaxcnmf.noise import ar_roots

AR1 = (0.95,)
AR2 = (1.6, -0.63)  # roots 0.9 and 0.7


def _batch(rng, g, lengths, sn_levels, T=None):
    """Traces of the given lengths padded (with NaN) to a common T, with their noise levels."""
    T = T or max(lengths)
    Y = np.full((len(lengths), T), np.nan)
    sns = np.empty(len(lengths))
    for i, L in enumerate(lengths):
        sns[i] = sn_levels[i % len(sn_levels)]
        Y[i, :L] = R.simulate_trace(rng, L, g, sns[i], rate=rng.uniform(0.01, 0.08), b=rng.uniform(0.2, 2))
    return Y, sns


def _check_certified(Y, g, sns, lengths, out, tol=1e-3):
    """Objective within tol of a certified lower bound on the optimum, and the noise constraint met to tol."""
    gaps = []
    for i, L in enumerate(lengths):
        y = Y[i, :L]
        c = np.asarray(out.c[i, :L], np.float64)
        s = np.asarray(out.s[i, :L], np.float64)
        r = y - float(out.b[i]) - c
        assert np.all(s >= -1e-9), i
        assert np.all(np.asarray(out.c[i, L:]) == 0) and np.all(np.asarray(out.s[i, L:]) == 0)
        rss, target = r @ r, sns[i] ** 2 * L
        assert rss <= target * (1 + tol), (i, rss / target)
        if float(out.lam[i]) > 0:  # the constraint is active at the optimum
            assert rss >= target * (1 - tol), (i, rss / target)
        obj, lb = R.constrained_gap(y, g, sns[i], s, r=r)
        gap = (obj - lb) / max(obj, 1e-12)
        gaps.append(gap)
        assert lb <= obj * (1 + 1e-9) + 1e-9
        assert gap <= tol, (i, L, gap)
    return np.array(gaps)


N_MAIN, T_MAIN = 52, 2000  # one compiled shape per AR order serves most tests (padding with `length`)


@pytest.fixture(scope="module", params=[AR1, AR2], ids=["ar1", "ar2"])
def solved(request):
    """52 padded traces per AR order (lengths 150..2000, three noise levels) and 2 long ones, solved in float64."""
    g = request.param
    rng = np.random.default_rng(len(g))
    lengths = [150, 150] + list(rng.integers(200, T_MAIN + 1, size=N_MAIN - 2))
    Y, sns = _batch(rng, g, lengths, (0.1, 0.3, 0.6), T=T_MAIN)
    long_lengths = [5000, 20000]
    Yl, snl = _batch(rng, g, long_lengths, (0.2, 0.4))
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns, length=np.array(lengths))
        outl = deconvolve_batch(Yl, np.array(g), snl, length=np.array(long_lengths))
    return dict(g=g, Y=Y, sns=sns, lengths=lengths, out=out, Yl=Yl, snl=snl, long_lengths=long_lengths, outl=outl)


def test_constrained_is_optimal_on_many_traces(solved):
    """54 traces per AR order (108 in all), lengths 150..20,000, three noise levels: objective within 1e-3 of a
    certified lower bound on the exact optimum (weak duality), noise constraint met to 1e-3 (in fact ~1e-12)."""
    d = solved
    gaps = _check_certified(d["Y"], d["g"], d["sns"], d["lengths"], d["out"])
    gaps_long = _check_certified(d["Yl"], d["g"], d["snl"], d["long_lengths"], d["outl"])
    assert max(gaps.max(), gaps_long.max()) < 1e-6  # exact up to rounding, far inside the required 1e-3


def test_constrained_matches_dense_reference(solved):
    """Objective, baseline, lam and c equal those of an independent dense NNLS + root-search solver (T = 150)."""
    d = solved
    for i in range(2):
        L = d["lengths"][i]
        y, sn = d["Y"][i, :L], d["sns"][i]
        ref = R.constrained_nnls(y, d["g"], sn)
        out = d["out"]
        assert float(np.sum(np.asarray(out.s[i]))) == pytest.approx(ref["obj"], rel=1e-6)
        assert float(out.b[i]) == pytest.approx(ref["b"], rel=1e-5, abs=1e-7)
        assert float(out.lam[i]) == pytest.approx(ref["lam"], rel=1e-5)
        np.testing.assert_allclose(np.asarray(out.c[i, :L]), ref["c"], atol=1e-5 * np.ptp(y))


def test_agrees_with_oasis(solved):
    """Spike trains correlate >= 0.99 with OASIS's constrained solution (same g, sn) on traces of >= 1000 frames.

    OASIS's AR(1) solver is exact, so every trace must agree. Its AR(2) solver is greedy and often misses the noise
    constraint (residual up to several times the budget here), so for AR(2) the median correlation must be >= 0.99 and
    any trace below 0.99 must be one where OASIS's answer is certifiably worse: infeasible, or feasible with a larger
    sum of spikes than ours.
    """
    oasis_functions = pytest.importorskip("oasis.functions")
    d = solved
    rows = [i for i, L in enumerate(d["lengths"]) if L >= 1000][:16]
    corrs = []
    for i in rows:
        L, sn = d["lengths"][i], d["sns"][i]
        y = d["Y"][i, :L]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c_o, s_o, b_o, *_ = oasis_functions.deconvolve(y, g=d["g"], sn=sn, penalty=1)
        s = np.asarray(d["out"].s[i, :L])
        corr = np.corrcoef(s[1:], s_o[1:])[0, 1]  # OASIS folds the initial value into s[0]
        corrs.append(corr)
        if len(d["g"]) == 1:
            assert corr >= 0.99, (i, corr)
        elif corr < 0.99:
            r_o = y - b_o - c_o
            infeasible = r_o @ r_o > sn**2 * L * (1 + 1e-3)
            assert infeasible or s_o[1:].sum() > s[1:].sum(), (i, corr)
    assert np.median(corrs) >= 0.99


def test_padded_trace_equals_unpadded(solved):
    """A trace padded with NaN to T gives the same answer as when it fills (almost) a row: padding is ignored."""
    d = solved
    i = int(np.argmax(d["lengths"]))
    L = d["lengths"][i]
    Y = np.full((N_MAIN, T_MAIN), np.nan)
    Y[:, :L] = d["Y"][i, :L]
    lengths = np.full(N_MAIN, L)
    with jax.enable_x64(True):
        again = deconvolve_batch(Y, np.array(d["g"]), d["sns"][i], length=lengths)  # same shape: no new compile
    np.testing.assert_allclose(np.asarray(again.c[3, :L]), np.asarray(d["out"].c[i, :L]), atol=1e-9)
    assert float(again.lam[3]) == pytest.approx(float(d["out"].lam[i]), rel=1e-9)


def test_float32_matches_float64(solved):
    d = solved
    full = [i for i, L in enumerate(d["lengths"]) if L >= 1000]
    out32 = deconvolve_batch(d["Y"].astype(np.float32), np.array(d["g"]), d["sns"], length=np.array(d["lengths"]))
    assert out32.c.dtype == jnp.float32
    c32, c64 = np.asarray(out32.c, np.float64)[full], np.asarray(d["out"].c)[full]
    rel = np.linalg.norm(c32 - c64, axis=1) / np.linalg.norm(c64, axis=1)
    assert np.median(rel) <= 1e-5 and np.all(rel <= 1e-4), rel


def test_s_min(solved):
    """Spikes are 0 or >= s_min and fewer than without the threshold; s_min = 0 is the plain problem."""
    d = solved
    g, lengths = d["g"], np.array(d["lengths"])
    with jax.enable_x64(True):
        zero = deconvolve_batch(d["Y"], np.array(g), d["sns"], length=lengths, s_min=0.0)
        thr = deconvolve_batch(d["Y"], np.array(g), d["sns"], length=lengths, s_min=0.5)
    np.testing.assert_array_equal(np.asarray(zero.s), np.asarray(d["out"].s))
    s = np.asarray(thr.s)[:, 1:]
    assert np.all((s == 0) | (s >= 0.5 - 1e-9))
    assert (s > 0).sum() < (np.asarray(zero.s)[:, 1:] > 1e-9).sum()
    assert (s >= 0.5).sum() > 0
    Y = np.nan_to_num(d["Y"])
    r = np.where(np.arange(T_MAIN) < lengths[:, None], Y - np.asarray(thr.b)[:, None] - np.asarray(thr.c), 0)
    # thresholding removes small spikes, so the fit can only get worse, and the noise budget may be out of reach
    rss = np.sum(r**2, axis=1)
    assert np.all(rss >= d["sns"] ** 2 * lengths * (1 - 1e-6)) and np.all(np.isfinite(rss))


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
@pytest.mark.parametrize("fixed", [False, True], ids=["b_c1_free", "b_c1_fixed"])
def test_penalized_matches_dense_reference(g, fixed):
    """Penalised form (given lam): c, objective equal the dense NNLS reference; with b and c1 fixed, s_0 is an
    ordinary penalised spike."""
    rng = np.random.default_rng(3)
    y = R.simulate_trace(rng, 160, g, 0.3, b=0.7, c0=2.0)
    lam = 0.8
    kw = dict(baseline=0.7, c1=0.0) if fixed else {}
    with jax.enable_x64(True):
        out = deconvolve(y, np.array(g), 0.3, lam=lam, **kw)
    ref = R.penalized_nnls(y, g, lam, b=0.7 if fixed else None, c1_free=not fixed)
    c = np.asarray(out.c)
    r = y - float(out.b) - c
    obj = 0.5 * r @ r + lam * float(np.sum(np.asarray(out.s)))
    assert obj == pytest.approx(ref["obj"], rel=1e-7)
    np.testing.assert_allclose(c, ref["c"], atol=1e-5)
    assert float(out.lam) == lam
    primal, lb = R.penalized_gap(y, g, lam, np.asarray(out.s), r, b_free=not fixed, b=0.7, c1_free=not fixed)
    assert primal - lb <= 1e-8 * primal
    if fixed:
        np.testing.assert_allclose(np.asarray(out.s), ref["s"], atol=1e-6)
        assert float(out.c1) == 0.0 and float(out.b) == 0.7 and float(out.s[0]) > 1.0


def test_compiles_once_per_shape():
    rng = np.random.default_rng(8)
    Y, sns = _batch(rng, AR1, [400] * 3, (0.3,))
    before = deconv._TRACE_COUNT["batch"]
    deconvolve_batch(Y, np.array(AR1), sns)
    after_first = deconv._TRACE_COUNT["batch"]
    deconvolve_batch(Y * 2 + 1, np.array([0.9]), sns * 2, length=[400, 300, 200])  # new values, lengths
    deconvolve_batch(Y[::-1], np.array([[0.8], [0.9], [0.95]]), 0.5, length=np.array([100, 399, 400]))
    assert deconv._TRACE_COUNT["batch"] - before <= 1
    assert deconv._TRACE_COUNT["batch"] == after_first


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_nonneg_baseline_matches_reference(g):
    """baseline="nonneg" (the default): where the free baseline comes out negative the solution is the exact optimum with
    b = 0 (dense float64 reference and a certified duality gap); where it is positive, the free solution."""
    rng = np.random.default_rng(13)
    T = 300
    Y = np.stack([R.simulate_trace(rng, T, g, 0.3, b=b) for b in (-0.4, -0.1, 0.6, 1.5)])
    sns = np.full(4, 0.3)
    with jax.enable_x64(True):
        free = deconvolve_batch(Y, np.array(g), sns, baseline=True)
        nonneg = deconvolve_batch(Y, np.array(g), sns)
    assert float(free.b[0]) < 0 and float(free.b[1]) < 0 and float(free.b[3]) > 0
    for i in range(4):
        y, s = Y[i], np.asarray(nonneg.s[i], np.float64)
        b = float(nonneg.b[i])
        if float(free.b[i]) < 0:
            assert b == 0.0
            ref = R.constrained_nnls(y, g, 0.3, b=0.0)
            assert float(np.sum(s)) == pytest.approx(ref["obj"], rel=1e-6)
            np.testing.assert_allclose(np.asarray(nonneg.c[i]), ref["c"], atol=1e-5 * np.ptp(y))
            r = y - np.asarray(nonneg.c[i])
            obj, lb = R.constrained_gap(y, g, 0.3, s, b_free=False, b=0.0, r=r)
            assert (obj - lb) / obj <= 1e-6
        else:
            np.testing.assert_allclose(np.asarray(nonneg.c[i]), np.asarray(free.c[i]), rtol=1e-9, atol=1e-12)
            assert b == pytest.approx(float(free.b[i]), rel=1e-9)
    with pytest.raises(ParameterError, match="nonneg"):
        deconvolve_batch(Y, np.array(g), sns, baseline="positive")


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_row_blocks_on_threads_match_one_block(g):
    """Splitting the rows over threads (130 rows into 2 blocks, the last padded) changes no result; a bad `threads`
    value is refused before anything runs."""
    rng = np.random.default_rng(12)
    Y, sns = _batch(rng, g, list(rng.integers(100, 301, size=130)), (0.2, 0.5), T=300)
    lengths = np.sum(np.isfinite(Y), axis=1)
    one = deconvolve_batch(Y, np.array(g), sns, length=lengths, threads=1)
    two = deconvolve_batch(Y, np.array(g), sns, length=lengths, threads=2)
    for field in ("c", "s", "b", "c1", "lam"):
        np.testing.assert_allclose(np.asarray(getattr(two, field)), np.asarray(getattr(one, field)), rtol=1e-5, atol=1e-6)
    assert np.asarray(two.c).shape == (130, 300)
    with pytest.raises(ParameterError, match="threads"):
        deconvolve_batch(Y, np.array(g), sns, length=lengths, threads=0)


def test_degenerate_traces(solved):
    """All-zero and constant traces (noise level 0, or a budget that c = 0 already meets) give c = s = 0, the right
    baseline and finite lam. Rows of 200 frames padded into the fixture's shape (no new compilation)."""
    g = solved["g"]
    Y = np.full((N_MAIN, T_MAIN), np.nan)
    Y[0::2, :200] = 0.0
    Y[1::2, :200] = 3.0
    sns = np.where(np.arange(N_MAIN) % 4 < 2, 0.0, 0.5)
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns, length=np.full(N_MAIN, 200))
    assert np.all(np.isfinite(np.asarray(out.c))) and np.all(np.isfinite(np.asarray(out.lam)))
    np.testing.assert_allclose(np.asarray(out.c), 0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.s), 0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out.b), np.where(np.arange(N_MAIN) % 2 == 0, 0.0, 3.0), atol=1e-9)


def test_bad_inputs_raise_before_compiling():
    y = np.random.default_rng(0).standard_normal((3, 100))
    y[1, 40] = np.nan
    with pytest.raises(TraceError, match="trace 1 .* frame 40"):
        deconvolve_batch(y, np.array(AR1), 0.3)
    with pytest.raises(TraceError, match="needs at least 8"):
        deconvolve_batch(np.zeros((2, 7)), np.array(AR2), 0.3)
    with pytest.raises(TraceError, match="trace 0"):
        deconvolve(np.zeros(3), np.array(AR1), 0.3)
    with pytest.raises(ParameterError, match="g"):
        deconvolve(np.zeros(50), np.array([1.1]), 0.3)
    with pytest.raises(ParameterError, match="s_min"):
        deconvolve(np.zeros(50), np.array([0.9]), 0.3, s_min=-1)
    with pytest.raises(ParameterError, match="baseline"):
        deconvolve(np.zeros(50), np.array([0.9]), 0.3, baseline="yes")
    # trailing NaN padding is fine when the lengths say so
    Y = np.random.default_rng(1).standard_normal((3, 400)).astype(np.float32)
    Y[0, 60:] = np.nan
    out = deconvolve_batch(Y, np.array(AR1), 1.0, length=[60, 400, 400])  # the compile-once test's shape
    assert np.all(np.isfinite(np.asarray(out.c)))


def test_deconvolve_is_jit_and_vmap_able():
    rng = np.random.default_rng(11)
    Y, sns = _batch(rng, AR1, [400] * 3, (0.3,))
    g = jnp.asarray(AR1)
    vm = jax.jit(jax.vmap(lambda y, sn: deconvolve(y, g, sn)))(jnp.asarray(Y, jnp.float32), jnp.asarray(sns, jnp.float32))
    batch = deconvolve_batch(Y.astype(np.float32), np.array(AR1), sns)
    assert isinstance(vm, DeconvResult)
    np.testing.assert_allclose(np.asarray(vm.c), np.asarray(batch.c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_deconvolve_rows_equals_vmapped_deconvolve_and_differentiates(g):
    """deconvolve_rows (one batched computation: time-major search and evaluation) gives vmap(deconvolve)'s solution
    under jit, and (AR(2), whose batched search and evaluation are new code) its gradient with respect to the traces
    is vmap(deconvolve)'s too."""
    rng = np.random.default_rng(21)
    Y, sns = _batch(rng, g, [600] * 9, (0.2, 0.4))
    Y, sns = jnp.asarray(Y, jnp.float32), jnp.asarray(sns, jnp.float32)
    G = jnp.tile(jnp.asarray(g, jnp.float32), (Y.shape[0], 1))
    rows = jax.jit(lambda Y: deconv.deconvolve_rows(Y, G, sns))(Y)
    vm = jax.jit(jax.vmap(lambda y, g, sn: deconvolve(y, g, sn)))(Y, G, sns)
    scale = float(jnp.max(jnp.abs(vm.c)))
    for name in ("c", "s", "b", "lam", "c1"):
        np.testing.assert_allclose(np.asarray(getattr(rows, name)), np.asarray(getattr(vm, name)), rtol=1e-4,
                                   atol=1e-4 * scale, err_msg=name)
    if len(g) == 1:  # AR(1)'s batched evaluation is the per-trace one's code (its gradient: the tests above)
        return
    w = jnp.asarray(rng.normal(size=Y.shape), jnp.float32)
    grad_rows = jax.grad(lambda Y: jnp.sum(w * deconv.deconvolve_rows(Y, G, sns).c))(Y)
    grad_vm = jax.grad(lambda Y: jnp.sum(w * jax.vmap(lambda y, g, sn: deconvolve(y, g, sn))(Y, G, sns).c))(Y)
    assert np.all(np.isfinite(np.asarray(grad_rows)))
    np.testing.assert_allclose(np.asarray(grad_rows), np.asarray(grad_vm), rtol=1e-3, atol=1e-3)


def test_estimates_g_and_sn_when_missing():
    """g and sn default to noise.estimate_ar / estimate_noise with the PSD mean (rows of the compile-once test's shape)."""
    pytest.importorskip("jaxcnmf.noise")
    rng = np.random.default_rng(12)
    Y = np.stack([R.simulate_trace(rng, 400, AR1, 0.2, rate=0.05) for _ in range(3)]).astype(np.float32)
    out = deconvolve_batch(Y, p=1)
    assert out.g.shape == (3, 1) and np.all((0.7 < np.asarray(out.g)) & (np.asarray(out.g) < 1.0))
    np.testing.assert_allclose(np.asarray(out.sn), 0.2, rtol=0.4)
    from jaxcnmf.noise import estimate_noise

    np.testing.assert_allclose(np.asarray(out.sn), np.asarray(estimate_noise(Y, method="mean")), rtol=1e-6)
    assert np.all(np.asarray(out.s) >= 0)


@pytest.mark.parametrize(
    "g, lam", [(AR1, None), (AR2, None), (AR2, 0.6)], ids=["ar1-constrained", "ar2-constrained", "ar2-penalised"]
)
def test_gradients_match_finite_differences(g, lam):
    """d loss / d y and d loss / d g of loss = w1'c + w2's + b + lam, against central differences (float64); the
    constrained form includes lam's and b's dependence on y. All perturbed problems are solved in one batch."""
    rng = np.random.default_rng(13)
    T = 60
    y0 = R.simulate_trace(rng, T, g, 0.2, rate=0.1)
    w1, w2 = rng.standard_normal(T), rng.standard_normal(T)
    p = len(g)
    ks = rng.choice(T, 8, replace=False)
    eps_y, eps_g = 1e-6, 1e-7
    Ys, Gs = [], []
    for k in ks:
        for sign in (1, -1):
            y = y0.copy()
            y[k] += sign * eps_y
            Ys.append(y), Gs.append(np.array(g))
    for j in range(p):
        for sign in (1, -1):
            gg = np.array(g, float)
            gg[j] += sign * eps_g
            Ys.append(y0), Gs.append(gg)
    with jax.enable_x64(True):
        def loss(y, gg):
            out = deconvolve(y, gg, 0.2, lam=lam)
            return jnp.sum(w1 * out.c) + jnp.sum(w2 * out.s) + out.b + out.lam

        gy, gg = jax.grad(loss, argnums=(0, 1))(jnp.asarray(y0), jnp.asarray(g))
        outs = deconvolve_batch(np.array(Ys), np.array(Gs), 0.2, lam=lam)
        f = np.asarray(outs.c) @ w1 + np.asarray(outs.s) @ w2 + np.asarray(outs.b) + np.asarray(outs.lam)
    for n, k in enumerate(ks):
        fd = (f[2 * n] - f[2 * n + 1]) / (2 * eps_y)
        assert float(gy[k]) == pytest.approx(fd, rel=1e-4, abs=1e-6)
    for j in range(p):
        m = 2 * len(ks) + 2 * j
        fd = (f[m] - f[m + 1]) / (2 * eps_g)
        assert float(gg[j]) == pytest.approx(fd, rel=1e-4, abs=1e-5)


def _check_nested_equals_frame_level(Y, g, sn):
    """`deconvolve_batch` (whose AR(1) search nests pool structures under the shared lane bound, and whose evaluation
    takes (b, lam) from that search) gives the certified optimum, equal to the frame-level search and evaluation of a
    plain vmap (no shared lane bound, so never nested), in float64."""
    sns = np.full(len(Y), sn)
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns)
        plain = jax.vmap(lambda y, s: deconvolve(y, jnp.asarray(g), s))(jnp.asarray(Y), jnp.asarray(sns))
    _check_certified(Y, g, sns, [Y.shape[1]] * len(Y), out, tol=1e-6)
    np.testing.assert_allclose(np.asarray(out.c), np.asarray(plain.c), rtol=1e-6, atol=1e-8 * np.ptp(Y))
    np.testing.assert_allclose(np.asarray(out.b), np.asarray(plain.b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rounds", [deconv._ROUNDS, 1], ids=["default", "fallback"])
def test_ar1_nested_search_from_a_start_above_the_answer(monkeypatch, rounds):
    """The AR(1) nested pool search starts from the (b, lam) of the first 1,024 frames; traces whose prefix is busier
    or sits higher than the rest put that start above the answer. The lowered restarts (and, with one round, the
    frame-level fallback) still give the certified optimum, equal to the frame-level search of a plain vmap (which
    has no shared lane bound and so never takes the nested path)."""
    monkeypatch.setattr(deconv, "_ROUNDS", rounds)
    rng = np.random.default_rng(31 + rounds)
    T, g, sn = 4096 + rounds, AR1, 0.3  # a new length per case: a fresh compilation reads _ROUNDS
    Y = np.stack([R.simulate_trace(rng, T, g, sn, rate=0.03, b=1.0) for _ in range(6)])
    Y[0, :1024] += 2.0  # prefix baseline far above the rest
    Y[1, :1024] += R.simulate_trace(rng, 1024, g, 0.0, rate=0.3, b=0.0)  # a burst: the prefix's lam is too high
    Y[2, 1024:] -= 0.9  # the rest lower: b near the floor
    Y[3] = sn * rng.standard_normal(T) + 0.5  # noise only: lam = 0 answer region
    _check_nested_equals_frame_level(Y, g, sn)


def test_ar1_nested_search_on_cut_element_rows(monkeypatch):
    """The nested search's iterations run on the first T / 4 or T / 2 rows of its elements when every lane's elements
    fit (a switch on the batch's largest count): the answer is the certified optimum and the same as the frame-level
    search's. With cuts at T / 4 and T / 2 these traces take the T / 2 branch in the first round and the full one in
    the second (checked by printing the branch once); the default cut (T / 2) runs in the other AR(1) tests."""
    monkeypatch.setattr(deconv, "_ELEMENT_ROWS", (4, 2))
    rng = np.random.default_rng(7)
    T, g, sn = 4202, AR1, 0.3  # a length of its own: a fresh compilation reads _ELEMENT_ROWS
    Y = np.stack([R.simulate_trace(rng, T, g, sn, rate=r, b=1.0) for r in (0.01, 0.03, 0.1, 0.3)])
    _check_nested_equals_frame_level(Y, g, sn)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_cpu_row_blocks_match_one_batch(monkeypatch, g):
    """On CPU the rows are solved in blocks of at most CPU_BLOCK_ROWS[p] (cache-sized; here 48: 130 rows -> 3 blocks,
    the last padded): the same results as one 130-row batch."""
    rng = np.random.default_rng(14)
    Y, sns = _batch(rng, g, list(rng.integers(100, 301, size=130)), (0.2, 0.5), T=300)
    lengths = np.sum(np.isfinite(Y), axis=1)
    monkeypatch.setattr(deconv, "CPU_BLOCK_ROWS", {1: 48, 2: 48})
    blocked = deconvolve_batch(Y, np.array(g), sns, length=lengths, threads=1)
    monkeypatch.setattr(deconv, "CPU_BLOCK_ROWS", {1: 10**6, 2: 10**6})
    whole = deconvolve_batch(Y, np.array(g), sns, length=lengths, threads=1)
    for field in ("c", "s", "b", "c1", "lam"):
        np.testing.assert_allclose(np.asarray(getattr(blocked, field)), np.asarray(getattr(whole, field)), rtol=1e-5,
                                   atol=1e-6)


def _dense_support_rss(y, g, support, b, lam):
    """float64 reference of deconv._support_rss (c1 free): min over s on the support (either sign) of
    1/2 ||y - b - K_S s_S||^2 + lam q_S' s_S, by a dense least-squares solve; returns ||y - b - K_S s_S||^2."""
    T = y.size
    cols = np.flatnonzero(support | (np.arange(T) == 0))
    K = R.kernel_matrix(g, T)[:, cols]
    q = R.penalty_vector(T, True)[cols]
    s = np.linalg.solve(K.T @ K, K.T @ (y - b) - lam * q)
    r = y - b - K @ s
    return r @ r


def _roots64(g) -> np.ndarray:
    """The kernel's roots (decay first) in float64."""
    with jax.enable_x64(True):
        return np.asarray(ar_roots(np.asarray(g, np.float64)))


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_refine_g_matches_dense_reference(g):
    """float64: _support_rss equals a dense least-squares reference, and _refine_g's decay time is the minimiser of
    that reference over a fine grid of decay times (golden section lands within 1 % of the grid's best)."""
    rng = np.random.default_rng(21)
    T = 300
    y = R.simulate_trace(rng, T, g, 0.2, rate=0.04, b=0.5)
    decay, rise = (float(v) for v in np.append(_roots64(g), 0.0)[:2])  # rise 0 for AR(1)
    start = np.exp(-1 / (-1.5 / np.log(decay)))  # decay time 1.5x the truth
    g0 = np.array([start + rise, -start * rise]) if len(g) == 2 else np.array([start])
    with jax.enable_x64(True):
        out = deconvolve_batch(y[None], g0, 0.2, refine_g=False)
        s, b, c1, lam = (np.asarray(v[0]) for v in (out.s, out.b, out.c1, out.lam))
        support = s > 0
        L = jnp.asarray(T, jnp.int32)
        for tau in (5.0, 20.0):  # the routine against the reference at two kernels
            d = np.exp(-1 / tau)
            gt = np.array([d + rise, -d * rise]) if len(g) == 2 else np.array([d])
            got = float(deconv._support_rss(jnp.asarray(y), jnp.asarray(gt), jnp.asarray(support), b, c1, lam, L,
                                            c1_free=True))
            assert got == pytest.approx(_dense_support_rss(y, gt, support, b, lam), rel=1e-9)
        g_ref = np.asarray(deconv._refine_g(jnp.asarray(y), jnp.asarray(g0), jnp.asarray(s), b, c1, lam, L,
                                            c1_free=True))
    tau0 = -1 / np.log(start)
    taus = tau0 * np.exp(np.linspace(np.log(deconv.REFINE_RANGE[0]), np.log(deconv.REFINE_RANGE[1]), 801))
    taus = taus[np.exp(-1 / taus) > rise + 1e-9]
    kernels = [np.array([np.exp(-1 / t) + rise, -np.exp(-1 / t) * rise]) if len(g) == 2 else np.array([np.exp(-1 / t)])
               for t in taus]
    rss = np.array([_dense_support_rss(y, k, support, b, lam) for k in kernels])
    tau_got = -1 / np.log(float(_roots64(g_ref)[0]))
    assert tau_got == pytest.approx(taus[np.argmin(rss)], rel=0.01)
    assert _dense_support_rss(y, g_ref, support, b, lam) <= rss.min() * (1 + 1e-4)
    if len(g) == 2:
        assert float(_roots64(g_ref)[1]) == pytest.approx(rise, rel=1e-9)  # the rise root is kept


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_refine_g_moves_toward_the_truth_and_stays_exact(g):
    """Simulated traces solved from a kernel whose decay time is 1.6x the truth: the refitted decay time is closer to
    the truth on every trace (its log error below 0.8 of the start's), and the second solve is certified exact for the refitted g (duality gap, noise budget)."""
    rng = np.random.default_rng(22)
    lengths = [1500, 2000, 3000, 2500]
    # noise levels where the refitted kernel can meet the budget (at sn = 0.1 the AR(2) refit, whose rise root is kept
    # from the start, misfits by more than the noise: lam = 0, the documented infeasible case)
    Y, sns = _batch(rng, g, lengths, (0.3, 0.5))
    decay, rise = (float(v) for v in np.append(_roots64(g), 0.0)[:2])  # rise 0 for AR(1)
    tau_true = -1 / np.log(decay)
    start = np.exp(-1 / (1.6 * tau_true))
    g0 = np.array([start + rise, -start * rise]) if len(g) == 2 else np.array([start])
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, g0, sns, length=np.array(lengths), refine_g=True)
    errors = []
    for i, L in enumerate(lengths):
        gi = np.asarray(out.g[i], np.float64)
        tau = -1 / np.log(float(_roots64(gi)[0]))
        errors.append(abs(np.log(tau / tau_true)))
        assert errors[-1] < 0.8 * np.log(1.6), (i, tau, tau_true)
        row = jax.tree_util.tree_map(lambda v: v[i : i + 1], out)
        _check_certified(Y[i : i + 1], tuple(gi), sns[i : i + 1], [L], row)
    print("log decay-time errors after the refit:", np.round(errors, 3), "start:", round(np.log(1.6), 3))


def test_refine_g_defaults_and_compiles_once():
    """refine_g=None refines estimated AR(1) kernels only; the refit compiles once per shape; inside jit the same
    refit as the batch."""
    rng = np.random.default_rng(23)
    Y = np.stack([R.simulate_trace(rng, 400, AR1, 0.2, rate=0.05) for _ in range(3)]).astype(np.float32)
    est = deconvolve_batch(Y, p=1, refine_g=False)
    before = deconv._TRACE_COUNT["refine"]
    auto = deconvolve_batch(Y, p=1)
    after_first = deconv._TRACE_COUNT["refine"]
    again = deconvolve_batch(Y * 2 + 1, p=1, refine_g=True)
    given = deconvolve_batch(Y, est.g, est.sn)  # a given kernel is not refitted
    assert after_first - before <= 1 and deconv._TRACE_COUNT["refine"] == after_first
    assert not np.allclose(np.asarray(auto.g), np.asarray(est.g))
    np.testing.assert_array_equal(np.asarray(given.g), np.asarray(est.g))
    assert np.all((0 < np.asarray(again.g)) & (np.asarray(again.g) < 1))
    jitted = jax.jit(jax.vmap(lambda y, g, sn: deconvolve(y, g, sn, refine_g=True)))(
        jnp.asarray(Y), jnp.asarray(est.g), jnp.asarray(est.sn))
    np.testing.assert_allclose(np.asarray(jitted.g), np.asarray(auto.g), rtol=1e-5)


def test_pilot_decay_rule_and_compiles_once():
    """float64: the AR(2) decay root is replaced by the refined AR(1) pilot's only where it is slower than the AR(1)
    estimate's; the rise root is kept (lowered to the new decay root when above it); compiled once per shape."""
    with jax.enable_x64(True):
        roots2 = np.array([[0.95, 0.6], [0.95, 0.6], [0.95, 0.9], [0.8, 0.5]])
        g2 = np.stack([roots2.sum(1), -roots2.prod(1)], 1)
        g1 = np.array([[0.9], [0.97], [0.9], [0.8]])  # row 1: the AR(1) decay is slower; row 3: equal
        g1r = np.array([[0.93], [0.93], [0.85], [0.7]])
        got = np.asarray(ar_roots(deconv._pilot_decay(jnp.asarray(g2), jnp.asarray(g1), jnp.asarray(g1r))))
        want = np.array([[0.93, 0.6], [0.95, 0.6], [0.85, 0.85], [0.8, 0.5]])
        np.testing.assert_allclose(got, want, rtol=1e-6)  # the double root is rebuilt through a square root
        before = deconv._pilot_decay._cache_size()
        for k in range(3):
            deconv._pilot_decay(jnp.asarray(g2 * (1 - 0.01 * k)), jnp.asarray(g1), jnp.asarray(g1r))
        assert deconv._pilot_decay._cache_size() == before


def test_estimated_ar2_kernel_takes_the_pilot_decay_and_compiles_once():
    """deconvolve_batch(p=2) without g: the AR(2) estimate with its decay root from the refined AR(1) pilot where the
    short-window AR(2) decay is slower (float64: exactly the composition of the parts). Six AR(2) traces with decay
    time 60 frames and rise time 2 frames: the rule leaves them as estimated, and the kernel is recovered (median
    decay time within 20 %, rise time within 35 %); six with decay time 200 frames plus a slow swing: the rule fires
    on some (not all), median decay time within 25 %, and the mean |log error| of the decay times is no larger than
    the plain estimate's. A second call of the same shape compiles nothing; refine_g=False keeps the plain estimate."""
    rng = np.random.default_rng(31)
    T = 3000

    def kernel(td, tr):
        d, q = np.exp(-1 / td), np.exp(-1 / tr)
        return (d + q, -d * q)

    swing = lambda k, a: a * np.sin(2 * np.pi * np.arange(T) / T + k)
    Y = np.stack([R.simulate_trace(rng, T, kernel(60.0, 2.0), 0.2, rate=0.02) + swing(k, 0.5) for k in range(6)]
                 + [R.simulate_trace(rng, T, kernel(200.0, 2.0), 0.3, rate=0.01) + swing(k, 1.0) for k in range(6)])
    with jax.enable_x64(True):
        plain = deconvolve_batch(Y, p=2, refine_g=False)
        pilot1 = deconvolve_batch(Y, p=1)  # the AR(1) default: the estimate refitted on its first solution
        g1 = np.asarray(deconvolve_batch(Y, p=1, refine_g=False).g)
        counts = dict(deconv._TRACE_COUNT)
        out = deconvolve_batch(Y, p=2)
        assert deconv._TRACE_COUNT == counts  # the pilot reuses the AR(1) programs, the solve the AR(2) one
        want = np.asarray(deconv._pilot_decay(plain.g, jnp.asarray(g1), pilot1.g))
        np.testing.assert_allclose(np.asarray(out.g), want, rtol=1e-12)
        again = deconvolve_batch(Y[::-1].copy(), p=2)
        assert deconv._TRACE_COUNT == counts
        _check_certified(Y[6:], tuple(np.asarray(out.g[6])), np.asarray(out.sn)[6:7], [T],
                         jax.tree_util.tree_map(lambda v: v[6:7], out))
    roots, roots0 = np.asarray(ar_roots(np.asarray(out.g))), np.asarray(ar_roots(np.asarray(plain.g)))
    assert np.all((0 < roots[:, 1]) & (roots[:, 1] <= roots[:, 0]) & (roots[:, 0] < 1))
    fired = roots[:, 0] != roots0[:, 0]
    assert not fired[:6].any() and 0 < fired[6:].sum() < 6, fired
    taus, taus0 = -1 / np.log(roots), -1 / np.log(roots0)
    assert abs(np.median(taus[:6, 0]) / 60 - 1) < 0.2, taus[:6, 0]
    assert abs(np.median(taus[:6, 1]) / 2 - 1) < 0.35, taus[:6, 1]
    assert abs(np.median(taus[6:, 0]) / 200 - 1) < 0.25, taus[6:, 0]
    assert np.mean(np.abs(np.log(taus[6:, 0] / 200))) <= np.mean(np.abs(np.log(taus0[6:, 0] / 200))), (taus, taus0)
    assert np.all(np.isfinite(np.asarray(again.g)))
